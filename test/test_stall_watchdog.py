"""The stall watchdog notices a thread that keeps the GIL and names it; a sleeping thread is no stall."""
import threading
import time

import pytest

from instascene_ros.ros.stall_watchdog import StallWatchdog


def hold_the_gil_for_a_while() -> int:
    # One builtin call over a C iterator: no bytecode boundary, so the GIL is never offered.
    total = sum(range(40_000_000))
    time.sleep(0.2)  # still in this frame (and alive) when the watchdog looks
    return total


def test_a_thread_that_holds_the_gil_is_reported_with_its_stack():
    reports = []
    watchdog = StallWatchdog(threshold_s=0.1, report=reports.append, period_s=0.01, report_every_s=0.0).start()
    try:
        time.sleep(0.1)
        tick = time.perf_counter()
        busy = threading.Thread(target=hold_the_gil_for_a_while, name="busy-worker")
        busy.start()
        busy.join()
        held = time.perf_counter() - tick
        time.sleep(0.1)
    finally:
        watchdog.stop()
    assert held > 0.4, f"the busy call took only {held:.3f} s on this machine: no stall to see"
    assert watchdog.stalls >= 1 and watchdog.worst_s > 0.1
    assert any("busy-worker: hold_the_gil_for_a_while (test_stall_watchdog.py" in r for r in reports), reports


def test_reports_are_rate_limited_but_every_stall_is_counted():
    reports = []
    watchdog = StallWatchdog(threshold_s=0.1, report=reports.append, period_s=0.01, report_every_s=10.0).start()
    try:
        for _ in range(2):
            busy = threading.Thread(target=hold_the_gil_for_a_while)
            busy.start()
            busy.join()
    finally:
        watchdog.stop()
    assert watchdog.stalls >= 2 and len(reports) == 1, (watchdog.stalls, reports)


def test_sleeping_and_waiting_threads_are_no_stall():
    reports = []
    watchdog = StallWatchdog(threshold_s=0.1, report=reports.append, period_s=0.01).start()
    try:
        sleepers = [threading.Thread(target=time.sleep, args=(0.3,)) for _ in range(3)]
        for thread in sleepers:
            thread.start()
        for thread in sleepers:
            thread.join()
    finally:
        watchdog.stop()
    assert watchdog.stalls == 0 and reports == []


def test_threshold_must_be_positive():
    with pytest.raises(ValueError, match="threshold_s"):
        StallWatchdog(threshold_s=0.0, report=print)


def test_the_traceback_file_catches_the_holder_during_the_stall(tmp_path):
    dump = tmp_path / "stalls.txt"
    watchdog = StallWatchdog(threshold_s=0.1, report=lambda message: None, period_s=0.01,
                             traceback_file=str(dump)).start()
    try:
        time.sleep(0.1)
        busy = threading.Thread(target=hold_the_gil_for_a_while, name="busy-worker")
        busy.start()
        busy.join()
        time.sleep(0.1)
    finally:
        watchdog.stop()
    text = dump.read_text()
    # faulthandler's own format: the holder's frame at the line that keeps the GIL
    assert "Timeout (0:00:00.11" in text and "in hold_the_gil_for_a_while" in text, text[:2000]
    assert f"{busy.ident:#x} busy-worker" in text


def test_a_long_garbage_collection_is_timed_and_named_in_the_report():
    import gc

    def collect_a_big_heap():
        heap = [[i] for i in range(1_500_000)]  # 1.5M tracked objects for the collector to walk
        gc.collect()
        time.sleep(0.2)
        return len(heap)

    reports = []
    # every stall reported: on a busy machine the first may be the scheduler's, not the collector's
    watchdog = StallWatchdog(threshold_s=0.05, report=reports.append, period_s=0.01, report_every_s=0.0).start()
    try:
        time.sleep(0.1)
        busy = threading.Thread(target=collect_a_big_heap, name="collector")
        busy.start()
        busy.join()
        time.sleep(0.1)
    finally:
        watchdog.stop()
    assert watchdog.gc_worst_s > 0.05, watchdog.gc_worst_s
    assert any("a generation-2 garbage collection took" in report for report in reports), reports
    assert watchdog._on_gc not in gc.callbacks  # stop() leaves the collector as it was
