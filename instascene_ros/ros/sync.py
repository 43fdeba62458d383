"""Approximate-time pairing of an image with its camera_info, depth and mask.

message_filters is not installable here, and its policy is not quite what a mapper wants: a 2D
segmenter publishes its mask a second after the image, and a mask-less frame is still worth
mapping. So the image is the pivot: each image waits (up to `max_wait_s` of newer traffic) for
the closest message of every other stream within `slop_s`; streams marked required must match or
the image is dropped with a counted reason, optional ones (masks) may be missing. Queues are
bounded. No rclpy here: stamps are float seconds, so the policy is tested directly.
"""
from __future__ import annotations

import threading
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Callable, Optional


@dataclass
class SyncedFrame:
    stamp: float
    image: Any
    others: dict[str, Any] = field(default_factory=dict)  # stream name -> message (absent when unmatched)


@dataclass(frozen=True)
class SyncConfig:
    slop_s: float = 0.02  # half a frame at 30 Hz: a camera's colour and depth share a stamp or nearly
    max_wait_s: float = 1.5  # a ~1 Hz segmenter's mask arrives within this
    queue_size: int = 30


class ApproximateSync:
    """Pairs images with the other streams; calls `on_frame(SyncedFrame)` and `on_drop(reason)`."""

    def __init__(self, required: list[str], optional: list[str], on_frame: Callable[[SyncedFrame], None],
                 on_drop: Optional[Callable[[str], None]] = None, config: SyncConfig = SyncConfig()):
        self.required, self.optional = list(required), list(optional)
        self.config = config
        self._on_frame = on_frame
        self._on_drop = on_drop or (lambda reason: None)
        self._streams: dict[str, deque] = {name: deque(maxlen=config.queue_size) for name in self.required + self.optional}
        self._pending: deque = deque()
        self._latest_stamp = float("-inf")
        self._last_emitted = float("-inf")
        self._lock = threading.Lock()
        self.drops: dict[str, int] = defaultdict(int)

    def add_image(self, stamp: float, message: Any) -> None:
        with self._lock:
            if stamp <= self._last_emitted or any(stamp == pending_stamp for pending_stamp, _ in self._pending):
                reason = "out-of-order or duplicate image stamp"
                self.drops[reason] += 1
                self._on_drop(reason)
                return
            if len(self._pending) == self.config.queue_size:
                self._drop_locked(self._pending.popleft()[0], "image queue full (input faster than pairing)")
            self._pending.append((stamp, message))
            self._latest_stamp = max(self._latest_stamp, stamp)
            ready = self._collect_locked()
        self._emit(ready)

    def add(self, stream: str, stamp: float, message: Any) -> None:
        with self._lock:
            self._streams[stream].append((stamp, message))
            self._latest_stamp = max(self._latest_stamp, stamp)
            ready = self._collect_locked()
        self._emit(ready)

    def flush(self) -> None:
        """Decide every pending image now (end of a stream)."""
        with self._lock:
            self._latest_stamp = float("inf")
            ready = self._collect_locked()
        self._emit(ready)

    def _closest(self, stream: str, stamp: float):
        best, best_gap = None, self.config.slop_s
        for other_stamp, message in self._streams[stream]:
            gap = abs(other_stamp - stamp)
            if gap <= best_gap:
                best, best_gap = message, gap
        return best

    def _drop_locked(self, stamp: float, reason: str) -> None:
        self.drops[reason] += 1
        self._on_drop(reason)

    def _collect_locked(self) -> list[SyncedFrame]:
        ready = []
        while self._pending:
            stamp, image = self._pending[0]
            matches = {name: self._closest(name, stamp) for name in self._streams}
            complete = all(matches[name] is not None for name in self._streams)
            expired = self._latest_stamp - stamp > self.config.max_wait_s
            if not (complete or expired):
                break  # keep order: later images wait behind this one
            self._pending.popleft()
            missing = [name for name in self.required if matches[name] is None]
            if missing:
                self._drop_locked(stamp, f"no {', '.join(missing)} within {self.config.slop_s:.3f} s of the image")
                continue
            self._last_emitted = stamp
            ready.append(SyncedFrame(stamp, image, {k: v for k, v in matches.items() if v is not None}))
        return ready

    def _emit(self, frames: list[SyncedFrame]) -> None:
        for frame in frames:  # outside the lock: the callback may take its time
            self._on_frame(frame)
