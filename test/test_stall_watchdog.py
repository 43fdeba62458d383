"""The stall watchdog notices a thread that keeps the GIL and names it (and a long garbage
collection), tells a stall spent waiting for a CPU from one spent waiting for the GIL; a sleeping
thread is no stall."""
import gc
import multiprocessing
import os
import threading
import time

import pytest

from instascene_ros.ros.stall_watchdog import SchedulerClock, StallWatchdog


def hold_the_gil_for_a_while() -> int:
    # One builtin call over a C iterator: no bytecode boundary, so the GIL is never offered.
    total = sum(range(40_000_000))
    time.sleep(0.2)  # still in this frame (and alive) when the watchdog looks
    return total


def collect_a_big_heap() -> int:
    heap = [[i] for i in range(1_500_000)]  # 1.5M tracked objects for the collector to walk
    gc.collect()
    time.sleep(0.2)
    return len(heap)


def watch(targets, threshold_s=0.1, report_every_s=0.0, **options):
    """Run each target in its own thread, one after the other, beside a watchdog; returns the
    stopped watchdog, its reports and the seconds the targets took."""
    reports = []
    watchdog = StallWatchdog(threshold_s=threshold_s, report=reports.append, period_s=0.01,
                             report_every_s=report_every_s, **options).start()
    try:
        time.sleep(0.1)
        tick = time.perf_counter()
        for target in targets:
            thread = threading.Thread(target=target, name=f"busy-{target.__name__}")
            thread.start()
            thread.join()
        took = time.perf_counter() - tick
        time.sleep(0.1)
    finally:
        watchdog.stop()
    return watchdog, reports, took


def test_a_thread_that_holds_the_gil_is_reported_with_its_stack():
    watchdog, reports, took = watch([hold_the_gil_for_a_while])
    assert took > 0.4, f"the busy call took only {took:.3f} s on this machine: no stall to see"
    assert watchdog.stalls >= 1 and watchdog.worst_s > 0.1
    expected = "busy-hold_the_gil_for_a_while: hold_the_gil_for_a_while (test_stall_watchdog.py"
    assert any(expected in report for report in reports), reports


def test_reports_are_rate_limited_but_every_stall_is_counted():
    watchdog, reports, _ = watch([hold_the_gil_for_a_while] * 2, report_every_s=10.0)
    assert watchdog.stalls >= 2 and len(reports) == 1, (watchdog.stalls, reports)


def test_sleeping_threads_are_no_stall():
    def sleep_a_while():
        time.sleep(0.3)

    watchdog, reports, _ = watch([sleep_a_while] * 3)
    assert watchdog.stalls == 0 and reports == []


def test_the_traceback_file_catches_the_holder_during_the_stall(tmp_path):
    dump = tmp_path / "stalls.txt"
    watch([hold_the_gil_for_a_while], traceback_file=str(dump))
    text = dump.read_text()
    # faulthandler's own format: the holder's frame at the line that keeps the GIL
    assert "Timeout (0:00:00.11" in text and "in hold_the_gil_for_a_while" in text, text[:2000]
    assert "busy-hold_the_gil_for_a_while" in text  # the thread names after each dump


def test_a_long_garbage_collection_is_timed_and_named_in_the_report():
    # every stall reported: on a busy machine the first may be the scheduler's, not the collector's
    watchdog, reports, _ = watch([collect_a_big_heap], threshold_s=0.05)
    assert watchdog.gc_worst_s > 0.05, watchdog.gc_worst_s
    assert any("a generation-2 garbage collection took" in report for report in reports), reports
    assert watchdog._on_gc not in gc.callbacks  # stop() leaves the collector as it was


def test_threshold_must_be_positive():
    with pytest.raises(ValueError, match="threshold_s"):
        StallWatchdog(threshold_s=0.0, report=print)


def test_a_long_collection_is_named_even_when_a_young_one_ran_after_it_in_the_same_stall():
    # The order the collector gives under load: a full collection ends, the next allocations
    # start a gen-0 one, and only then does the watchdog get the GIL back.
    watchdog = StallWatchdog(threshold_s=0.05, report=print)
    asleep = time.monotonic()
    watchdog._on_gc("start", {"generation": 2})
    time.sleep(0.12)
    watchdog._on_gc("stop", {"generation": 2})
    watchdog._on_gc("start", {"generation": 0})
    woke = time.monotonic()
    words = watchdog._culprit_in(asleep, woke, late=woke - asleep)
    assert "a generation-2 garbage collection took" in words, words
    watchdog._on_gc("stop", {"generation": 0})
    # A collection that ended before this sleep began is no part of the stall.
    later = time.monotonic()
    time.sleep(0.06)
    assert watchdog._culprit_in(later, time.monotonic(), late=0.06) == ""


def spin_on_cpu_0(seconds: float) -> None:
    os.sched_setaffinity(0, {0})
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        pass


linux_scheduler = pytest.mark.skipif(not SchedulerClock().available or not hasattr(os, "sched_setaffinity"),
                                     reason="needs Linux's /proc scheduler statistics and CPU affinity")


class ClockThatCallsEverySecondACpuWait(SchedulerClock):
    """/proc as it reads for a thread that spends all of its time runnable without a CPU."""

    def runqueue_wait_s(self) -> float:
        return time.monotonic()


@linux_scheduler
def test_a_stall_spent_waiting_for_a_cpu_is_told_from_one_spent_waiting_for_the_gil(monkeypatch):
    # Starvation cannot be staged reliably on a machine that runs other work (the scheduler
    # favours a waking thread, and a real-time spinner is throttled), so the run-queue counter is
    # stood in for here, and read for real in the next test. A stall made by a GIL hold, with a
    # counter that says the thread waited for a CPU all along: the whole stall is a CPU wait.
    monkeypatch.setattr("instascene_ros.ros.stall_watchdog.SchedulerClock", ClockThatCallsEverySecondACpuWait)
    watchdog, reports, _ = watch([hold_the_gil_for_a_while])
    assert watchdog.stalls >= 1 and watchdog.stalled_s > 0.1, (watchdog.stalls, watchdog.stalled_s)
    assert watchdog.cpu_wait_s >= 0.8 * watchdog.stalled_s, (watchdog.cpu_wait_s, watchdog.stalled_s)
    assert watchdog.cpu_wait_s <= watchdog.stalled_s + 1e-9  # never more than the stall (the sleep is not counted)
    assert "waiting for a CPU" in reports[0] and "tasks runnable on" in reports[0], reports[0]
    monkeypatch.undo()

    # Held: one thread keeps the GIL on an otherwise idle machine; the watchdog had a CPU.
    watchdog, reports, _ = watch([hold_the_gil_for_a_while])
    assert watchdog.stalls >= 1 and watchdog.cpu_wait_s <= 0.2 * watchdog.stalled_s, (watchdog.cpu_wait_s,
                                                                                    watchdog.stalled_s)


@linux_scheduler
def test_the_scheduler_clock_counts_a_threads_wait_for_a_cpu():
    clock, waited = SchedulerClock(), {}

    def spin_for_half_a_second_on_cpu_0():
        os.sched_setaffinity(0, {0})
        mine = SchedulerClock()
        before = mine.runqueue_wait_s()
        spin_on_cpu_0(0.5)
        waited["s"] = mine.runqueue_wait_s() - before
        mine.close()

    rivals = [multiprocessing.get_context("fork").Process(target=spin_on_cpu_0, args=(0.8,)) for _ in range(3)]
    for rival in rivals:
        rival.start()
    thread = threading.Thread(target=spin_for_half_a_second_on_cpu_0)
    thread.start()
    thread.join()
    for rival in rivals:
        rival.join()
    # Four spinners on one CPU: each runs about a quarter of the time and waits the rest (the
    # first field, time on a CPU, would read about 0.125 s).
    assert 0.25 < waited["s"] < 0.5, waited
    stolen, runnable = clock.steal_and_runnable()
    assert stolen >= 0.0 and runnable >= 1  # this thread itself is running
    clock.close()


def test_a_declared_episode_that_overlaps_a_stall_is_named():
    # e.g. malloc_trim: the C call releases the GIL, but a thread that allocates meanwhile waits
    # for the heap's lock with the GIL held. Here a thread holds the GIL during the episode.
    reports = []
    watchdog = StallWatchdog(threshold_s=0.1, report=reports.append, period_s=0.01, report_every_s=0.0).start()
    try:
        time.sleep(0.1)
        with watchdog.episode("malloc_trim (memory given back)"):
            holder = threading.Thread(target=hold_the_gil_for_a_while)
            holder.start()
            holder.join()
        time.sleep(0.1)
        quiet = watchdog.stalls
        with watchdog.episode("an episode far from any stall"):
            time.sleep(0.05)
        time.sleep(0.1)
    finally:
        watchdog.stop()
    assert any("malloc_trim (memory given back) took" in report for report in reports), reports
    if watchdog.stalls == quiet:  # (a stall from elsewhere on a busy machine would overlap it honestly)
        assert not any("far from any stall" in report for report in reports), reports


def test_an_unreadable_scheduler_clock_costs_the_split_not_the_watchdog(monkeypatch):
    def unknown_format(self):
        raise ValueError("a /proc/thread-self/schedstat this parser does not know")

    monkeypatch.setattr(SchedulerClock, "runqueue_wait_s", unknown_format)
    watchdog, reports, _ = watch([hold_the_gil_for_a_while])
    assert watchdog.stalls >= 1 and watchdog.cpu_wait_s == 0.0, (watchdog.stalls, watchdog.cpu_wait_s)
    assert reports and "waiting for a CPU" not in reports[0], reports
