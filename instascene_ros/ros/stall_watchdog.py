"""Notice when the whole process stops running Python, and say which thread was at fault.

The node answers services from an executor while a worker thread maps. The worker's heavy
parts (torch ops, numba kernels compiled with nogil) release the GIL, so queries run beside
them; a long C call that keeps the GIL (a big pure-Python-object loop in a builtin, a library
that does not release it) stops every other thread instead, and a query that arrives then waits
for it. From outside that only shows as a burst of slow answers of every kind at once.

`StallWatchdog` is a daemon thread that sleeps a short period and measures how late it wakes.
Sleeping releases the GIL; waking needs it back, so a late wake-up means another thread held
the GIL (or the machine gave the process no CPU) for about that long. At that moment it takes
every other thread's stack: the thread that held the GIL has just let go of it, so its stack
shows the line that ran (a thread waiting in a lock or a sleep shows that wait instead).
ROS-free: the node gives it a `report` callable (its logger) and reads its counters.

The cyclic garbage collector is such a holder: a full collection walks every tracked object
with the GIL held (a loaded node tracks ~460k, mostly its libraries' functions, tuples and
dicts: 200 ms). The watchdog times every collection (`gc.callbacks`) and names one that
overlapped a stall; the node freezes its startup objects out of the collector's sight.

Those stacks are taken after the stall. With `traceback_file`, the thread also arms Python's
`faulthandler` before every sleep: its C timer thread needs no GIL, so when the watchdog has not
re-armed it within threshold + period it writes every thread's stack to that file *during* the
stall, the holder's at the line of the call that keeps the GIL. Each re-arm starts a thread
(about 50 a second): a debugging aid, off by default.
"""
from __future__ import annotations

import faulthandler
import gc
import sys
import threading
import time
import traceback
from collections import deque
from typing import Callable, Optional


class StallWatchdog:
    """Reports wake-ups later than `threshold_s` through `report(message)` (at most one report per
    `report_every_s`; every stall is counted). `stalls`, `worst_s` and `gc_worst_s` are for diagnostics."""

    GC_WORTH_NAMING_S = 0.001  # young collections take microseconds; keep them out of the history

    def __init__(self, threshold_s: float, report: Callable[[str], None], period_s: float = 0.02,
                 report_every_s: float = 10.0, frames: int = 4, traceback_file: Optional[str] = None):
        if threshold_s <= 0.0:
            raise ValueError(f"threshold_s must be > 0, not {threshold_s}")
        self.threshold_s, self.period_s = float(threshold_s), float(period_s)
        self.report_every_s, self.frames = float(report_every_s), int(frames)
        self._report = report
        self.stalls = 0
        self.worst_s = 0.0
        self._reported_at = -float("inf")
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._traceback_file = open(traceback_file, "a") if traceback_file else None
        # Garbage collections: the longest, the one running, and the recent ones worth naming.
        # Not just the last: a stall that holds a long collection often ends in a gen-0 one
        # started by the next few hundred allocations, before the watchdog gets the GIL back.
        self.gc_worst_s = 0.0
        self._gc_running: Optional[tuple[float, int]] = None  # (start, generation) while one runs
        self._gc_recent: deque[tuple[float, float, int]] = deque(maxlen=64)  # (start, end, generation)

    def _on_gc(self, phase: str, info: dict) -> None:
        now = time.monotonic()
        if phase == "start":
            self._gc_running = (now, int(info.get("generation", -1)))
            return
        if self._gc_running is not None:
            started, generation = self._gc_running
            self.gc_worst_s = max(self.gc_worst_s, now - started)
            if now - started >= self.GC_WORTH_NAMING_S:
                self._gc_recent.append((started, now, generation))
            self._gc_running = None

    def _collection_in(self, since: float, now: float, late: float) -> str:
        """Words for the garbage collection that took the largest part of the stall between
        `since` and `now`, if that part is a good share of it: one that ended in it, or one still
        running (the watchdog can win the GIL inside the collector's own "stop" callback, before
        it is recorded)."""
        collections = list(self._gc_recent)
        running = self._gc_running
        if running is not None:
            collections.append((running[0], now, running[1]))
        best_overlap, best_generation = 0.0, -1
        for started, ended, generation in collections:
            overlap = min(ended, now) - max(started, since)
            if overlap > best_overlap:
                best_overlap, best_generation = overlap, generation
        if best_overlap <= 0.2 * late:
            return ""
        return f"; a generation-{best_generation} garbage collection took {best_overlap * 1e3:.0f} ms of it"

    def start(self) -> "StallWatchdog":
        gc.callbacks.append(self._on_gc)
        self._thread = threading.Thread(target=self._run, name="instascene-stall-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        if self._traceback_file is not None:
            faulthandler.cancel_dump_traceback_later()
            self._traceback_file.close()
            self._traceback_file = None

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._traceback_file is not None:
                faulthandler.dump_traceback_later(self.threshold_s + self.period_s, file=self._traceback_file)
            asleep = time.monotonic()
            time.sleep(self.period_s)
            late = time.monotonic() - asleep - self.period_s
            if late <= self.threshold_s:
                continue
            # The stacks first (only for a report: they cost the GIL a while), every line below
            # runs while the other threads move on.
            woke = time.monotonic()
            report = woke - self._reported_at >= self.report_every_s
            stacks = self._stacks() if report else ""
            if self._traceback_file is not None:
                names = ", ".join(f"{thread.ident:#x} {thread.name}" for thread in threading.enumerate())
                self._traceback_file.write(f"(the stall above: {late * 1e3:.0f} ms; threads: {names})\n")
                self._traceback_file.flush()
            self.stalls += 1
            self.worst_s = max(self.worst_s, late)
            collection = self._collection_in(asleep, woke, late)
            if report:
                self._reported_at = woke
                self._report(f"process stalled {late * 1e3:.0f} ms (stall {self.stalls}, worst "
                             f"{self.worst_s * 1e3:.0f} ms){collection}; threads at wake-up:\n{stacks}")

    def _stacks(self) -> str:
        names = {thread.ident: thread.name for thread in threading.enumerate()}
        own = threading.get_ident()
        lines = []
        for ident, frame in sys._current_frames().items():
            if ident == own:
                continue
            summary = traceback.extract_stack(frame)[-self.frames:]
            where = " <- ".join(f"{entry.name} ({entry.filename.rsplit('/', 1)[-1]}:{entry.lineno})"
                                for entry in reversed(summary))
            lines.append(f"  {names.get(ident, ident)}: {where}")
        return "\n".join(lines)
