"""The stall watchdog notices a thread that keeps the GIL and names it (and a long garbage
collection); a sleeping thread is no stall."""
import gc
import threading
import time

import pytest

from instascene_ros.ros.stall_watchdog import StallWatchdog


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
    words = watchdog._collection_in(asleep, woke, late=woke - asleep)
    assert "a generation-2 garbage collection took" in words, words
    watchdog._on_gc("stop", {"generation": 0})
    # A collection that ended before this sleep began is no part of the stall.
    later = time.monotonic()
    time.sleep(0.06)
    assert watchdog._collection_in(later, time.monotonic(), late=0.06) == ""
