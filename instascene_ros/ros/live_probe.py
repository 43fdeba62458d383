"""`instascene bench live`'s planner stand-in: asks the node while it maps a live stream.

On a fixed period it calls `~/list_instances` and `~/segment_at_pixel` (id only; every
`mask_every`-th tick with the mask) and times each answer from the request to the response, over
real DDS. Every /diagnostics message is kept with its arrival time (queue depth, drops, frames,
keyframes, resident memory), so the bench can tell whether the node kept up and stayed flat.
"""
from __future__ import annotations

import time
from typing import Callable

import rclpy
from builtin_interfaces.msg import Time

from instascene_ros.ros.demo_client import DemoClient
from instascene_ros.srv import ListInstances, SaveMap, SegmentAtPixel


class LiveProbe(DemoClient):
    def __init__(self, node_prefix: str = "/instascene_node"):
        super().__init__(node_prefix)
        self.save_client = self.create_client(SaveMap, f"{self.prefix}/save_map")
        self.history: list[tuple[float, dict]] = []  # (monotonic seconds, diagnostics values)
        # kind -> [(monotonic seconds, answer seconds, success)]
        self.answers: dict[str, list[tuple[float, float, bool]]] = {"list_instances": [], "segment_at_pixel": [],
                                                                      "segment_at_pixel_mask": []}
        self._in_flight: dict[str, tuple[object, float]] = {}

    def _on_diagnostics(self, message) -> None:
        super()._on_diagnostics(message)
        if self.diagnostics:
            self.history.append((time.monotonic(), dict(self.diagnostics)))

    def _ask(self, kind: str, client, request) -> None:
        """Send one request unless the previous one of this kind is still unanswered (a planner
        does not pile requests on a busy server; the wait is counted when it answers)."""
        if kind in self._in_flight or not client.service_is_ready():
            return
        self._in_flight[kind] = (client.call_async(request), time.monotonic())

    def _collect(self) -> None:
        for kind, (future, sent) in list(self._in_flight.items()):
            if future.done():
                response = future.result()
                self.answers[kind].append((sent, time.monotonic() - sent, bool(getattr(response, "success", True))))
                del self._in_flight[kind]

    def probe_while(self, running: Callable[[], bool], period_s: float, u: float, v: float,
                    mask_every: int = 4) -> None:
        """Ask on every tick of `period_s` while `running()`; spins the node meanwhile."""
        next_tick, tick = time.monotonic(), 0
        while running():
            rclpy.spin_once(self, timeout_sec=0.01)
            self._collect()
            if time.monotonic() < next_tick:
                continue
            next_tick += period_s
            tick += 1
            self._ask("list_instances", self.list_client, ListInstances.Request())
            with_mask = mask_every > 0 and tick % mask_every == 0
            request = SegmentAtPixel.Request(stamp=Time(), u=float(u), v=float(v), return_mask=with_mask)
            self._ask("segment_at_pixel_mask" if with_mask else "segment_at_pixel", self.segment_client, request)
        deadline = time.monotonic() + 30.0  # answers still on the way are waited for, not lost
        while self._in_flight and time.monotonic() < deadline:
            rclpy.spin_once(self, timeout_sec=0.05)
            self._collect()

    def save_map(self, path: str, timeout_s: float = 300.0):
        return self._call(self.save_client, SaveMap.Request(path=path), timeout_s)
