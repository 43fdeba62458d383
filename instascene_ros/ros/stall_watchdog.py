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

The GIL is not the only way to stop a thread: on a machine with fewer cores than runnable
threads (the live bench puts a node, a publisher and a planner stand-in on 2), the watchdog may
wait for a CPU instead, and a virtual machine's CPUs can be taken by the hypervisor (steal). On
Linux the kernel counts both (`SchedulerClock`), so each stall is split into the part this thread
spent runnable on a run queue, the CPU time stolen meanwhile, and the rest: waiting for the GIL
(its holder may itself have waited for a CPU meanwhile; only that thread's own counters could
say, and reading every thread's on every wake-up would cost more than the watchdog should).

Those stacks are taken after the stall. With `traceback_file`, the thread also arms Python's
`faulthandler` before every sleep: its C timer thread needs no GIL, so when the watchdog has not
re-armed it within threshold + period it writes every thread's stack to that file *during* the
stall, the holder's at the line of the call that keeps the GIL. Each re-arm starts a thread
(about 50 a second): a debugging aid, off by default.
"""
from __future__ import annotations

import contextlib
import faulthandler
import gc
import os
import sys
import threading
import time
import traceback
from collections import deque
from typing import Callable, Optional


class SchedulerClock:
    """The kernel's account of where a thread's time went, read from /proc (Linux; `available`
    is False elsewhere): this thread's total wait on a run queue (runnable, no CPU given), and the
    CPU time the hypervisor took from the whole machine (steal, summed over its CPUs). Build it in
    the thread it is to watch: /proc/thread-self names the thread that opens it."""

    def __init__(self):
        self.cpus = os.cpu_count() or 1
        self._tick_s = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01
        try:
            self._schedstat = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
            self._stat = os.open("/proc/stat", os.O_RDONLY)
        except (OSError, AttributeError):
            self._schedstat = self._stat = None

    @property
    def available(self) -> bool:
        return self._schedstat is not None

    def runqueue_wait_s(self) -> float:
        # "<ns on a CPU> <ns waiting on a run queue> <timeslices>"
        return int(os.pread(self._schedstat, 128, 0).split()[1]) * 1e-9

    def steal_and_runnable(self) -> tuple[float, int]:
        """(CPU seconds stolen since boot over all CPUs, tasks runnable right now, machine-wide)."""
        text = os.pread(self._stat, 1 << 16, 0)
        fields = text[:text.index(b"\n")].split()  # "cpu user nice system idle iowait irq softirq steal ..."
        steal = int(fields[8]) * self._tick_s if len(fields) > 8 else 0.0
        at = text.find(b"procs_running ")
        runnable = int(text[at + 14:text.index(b"\n", at)]) if at >= 0 else -1
        return steal, runnable

    def close(self) -> None:
        for fd in (self._schedstat, self._stat):
            if fd is not None:
                os.close(fd)
        self._schedstat = self._stat = None


class StallWatchdog:
    """Reports wake-ups later than `threshold_s` through `report(message)` (at most one report per
    `report_every_s`; every stall is counted). `stalls`, `worst_s`, `gc_worst_s` and the stalls'
    seconds (`stalled_s`, of which `cpu_wait_s` waiting for a CPU and `steal_s` stolen, per CPU)
    are for diagnostics."""

    WORTH_NAMING_S = 0.001  # young collections take microseconds; keep them out of the history

    def __init__(self, threshold_s: float, report: Callable[[str], None], period_s: float = 0.02,
                 report_every_s: float = 10.0, frames: int = 4, traceback_file: Optional[str] = None):
        if threshold_s <= 0.0:
            raise ValueError(f"threshold_s must be > 0, not {threshold_s}")
        self.threshold_s, self.period_s = float(threshold_s), float(period_s)
        self.report_every_s, self.frames = float(report_every_s), int(frames)
        self._report = report
        self.stalls = 0
        self.worst_s = 0.0
        self.stalled_s = self.cpu_wait_s = self.steal_s = 0.0
        self._reported_at = -float("inf")
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._traceback_file = open(traceback_file, "a") if traceback_file else None
        # Episodes that may stop every thread: garbage collections (timed by the collector's
        # callbacks) and work the node declares (`episode`). The ones running and the recent ones
        # worth naming: not just the last, since a stall that holds a long collection often ends
        # in a gen-0 one started by the next few hundred allocations, before the watchdog gets
        # the GIL back.
        self.gc_worst_s = 0.0
        self._gc_running: Optional[tuple[float, int]] = None  # (start, generation) while one runs
        self._running: dict[int, tuple[float, str]] = {}  # declared episodes: token -> (start, words)
        self._recent: deque[tuple[float, float, str]] = deque(maxlen=64)  # (start, end, words)

    def _on_gc(self, phase: str, info: dict) -> None:
        now = time.monotonic()
        if phase == "start":
            self._gc_running = (now, int(info.get("generation", -1)))
            return
        if self._gc_running is not None:
            started, generation = self._gc_running
            self.gc_worst_s = max(self.gc_worst_s, now - started)
            if now - started >= self.WORTH_NAMING_S:
                self._recent.append((started, now, self._gc_words(generation)))
            self._gc_running = None

    @staticmethod
    def _gc_words(generation: int) -> str:
        return f"a generation-{generation} garbage collection"

    @contextlib.contextmanager
    def episode(self, words: str):
        """Time a piece of work that may stop other threads without holding the GIL itself (a
        C call that locks what they need: glibc's malloc_trim locks each heap it trims, and a
        thread that allocates meanwhile waits with the GIL held), so a stall it overlaps names
        it: "...; `words` took N ms of it"."""
        token = object()
        self._running[id(token)] = (time.monotonic(), words)
        try:
            yield
        finally:
            started, _ = self._running.pop(id(token))
            ended = time.monotonic()
            if ended - started >= self.WORTH_NAMING_S:
                self._recent.append((started, ended, words))

    def _culprit_in(self, since: float, now: float, late: float) -> str:
        """Words for the episode (a garbage collection or a declared one) that took the largest
        part of the stall between `since` and `now`, if that part is a good share of it: one that
        ended in it, or one still running (the watchdog can win the GIL inside the collector's own
        "stop" callback, before it is recorded)."""
        episodes = list(self._recent)
        running = self._gc_running
        if running is not None:
            episodes.append((running[0], now, self._gc_words(running[1])))
        episodes += [(started, now, words) for started, words in list(self._running.values())]
        best_overlap, best_words = 0.0, ""
        for started, ended, words in episodes:
            overlap = min(ended, now) - max(started, since)
            if overlap > best_overlap:
                best_overlap, best_words = overlap, words
        if best_overlap <= 0.2 * late:
            return ""
        return f"; {best_words} took {best_overlap * 1e3:.0f} ms of it"

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
        clock = SchedulerClock()
        try:
            self._watch(clock)
        finally:
            clock.close()

    def _watch(self, clock: SchedulerClock) -> None:
        waited_before = stolen_before = 0.0
        while not self._stop.is_set():
            if self._traceback_file is not None:
                faulthandler.dump_traceback_later(self.threshold_s + self.period_s, file=self._traceback_file)
            if clock.available:
                try:
                    waited_before, (stolen_before, _) = clock.runqueue_wait_s(), clock.steal_and_runnable()
                except (OSError, ValueError, IndexError):  # a /proc this parser does not know:
                    clock.close()  # go on without the split rather than lose the watchdog
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
            self.stalled_s += late
            scheduler = ""
            if clock.available:  # (read before this sleep, so these reads parse too)
                # The sleep itself is never a wait for a CPU; the wake-up's and the GIL hand-over's are.
                waited = min(late, clock.runqueue_wait_s() - waited_before)
                stolen_now, runnable = clock.steal_and_runnable()
                stolen = min(late, (stolen_now - stolen_before) / clock.cpus)
                self.cpu_wait_s += waited
                self.steal_s += stolen
                scheduler = (f": {waited * 1e3:.0f} ms of it waiting for a CPU ({runnable} tasks runnable on "
                             f"{clock.cpus} CPUs), {stolen * 1e3:.0f} ms per CPU stolen by the hypervisor, "
                             f"the rest waiting for the GIL")
            collection = self._culprit_in(asleep, woke, late)
            if report:
                self._reported_at = woke
                self._report(f"process stalled {late * 1e3:.0f} ms (stall {self.stalls}, worst "
                             f"{self.worst_s * 1e3:.0f} ms){scheduler}{collection}; threads at wake-up:\n{stacks}")

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
