"""A small TF buffer: /tf and /tf_static in, `lookup(target, source, stamp)` out.

tf2_ros is not installable from PyPI, so the node keeps its own buffer. It follows tf2's
semantics where a robot engineer would rely on them: static transforms hold at every time,
dynamic ones are interpolated (linear translation, slerp rotation) between the two samples that
bracket the stamp, a stamp outside a dynamic edge's history is an error (no extrapolation), and
a time of 0 means "latest common time". The class has no rclpy dependency so it is tested
directly; `TfListener` attaches it to a node.
"""
from __future__ import annotations

import bisect
import threading
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from instascene_ros.ros.conversions import quaternion_from_rotation, rotation_from_quaternion


class TransformError(LookupError):
    """No transform can be given for the request; the text says why (missing frame, time, ...)."""


@dataclass
class _Edge:
    """Transforms from `child` into `parent` (parent_T_child) over time."""

    static: bool = False
    stamps: list = field(default_factory=list)  # sorted seconds
    translations: list = field(default_factory=list)
    quaternions: list = field(default_factory=list)  # (x, y, z, w)


def _slerp(q0: np.ndarray, q1: np.ndarray, t: float) -> np.ndarray:
    dot = float(np.dot(q0, q1))
    if dot < 0.0:  # take the short way round
        q1, dot = -q1, -dot
    if dot > 0.9995:
        q = q0 + t * (q1 - q0)
        return q / np.linalg.norm(q)
    theta = np.arccos(dot)
    return (np.sin((1 - t) * theta) * q0 + np.sin(t * theta) * q1) / np.sin(theta)


class TransformBuffer:
    """Thread-safe store of a frame tree's transforms with a bounded history per edge."""

    def __init__(self, cache_seconds: float = 10.0):
        self.cache_seconds = cache_seconds
        self._edges: dict[str, tuple[str, _Edge]] = {}  # child -> (parent, edge)
        self._lock = threading.Lock()

    def set_transform(self, parent: str, child: str, stamp: float, translation, quaternion_xyzw,
                      static: bool = False) -> None:
        parent, child = parent.lstrip("/"), child.lstrip("/")
        if parent == child:
            raise TransformError(f"transform from '{child}' to itself")
        translation = np.asarray(translation, float)
        quaternion = np.asarray(quaternion_xyzw, float)
        if not (np.all(np.isfinite(translation)) and np.all(np.isfinite(quaternion))):
            raise TransformError(f"non-finite transform {parent} -> {child}")
        norm = np.linalg.norm(quaternion)
        if norm < 1e-9:
            raise TransformError(f"zero quaternion in transform {parent} -> {child}")
        quaternion = quaternion / norm
        with self._lock:
            existing = self._edges.get(child)
            if existing is None or existing[0] != parent or existing[1].static != static:
                existing = (parent, _Edge(static=static))  # re-parenting replaces the history
                self._edges[child] = existing
            edge = existing[1]
            if static:
                edge.stamps, edge.translations, edge.quaternions = [0.0], [translation], [quaternion]
                return
            index = bisect.bisect_left(edge.stamps, stamp)
            if index < len(edge.stamps) and edge.stamps[index] == stamp:
                edge.translations[index], edge.quaternions[index] = translation, quaternion
            else:
                edge.stamps.insert(index, stamp)
                edge.translations.insert(index, translation)
                edge.quaternions.insert(index, quaternion)
            horizon = edge.stamps[-1] - self.cache_seconds
            drop = bisect.bisect_left(edge.stamps, horizon)
            if drop > 0:
                del edge.stamps[:drop], edge.translations[:drop], edge.quaternions[:drop]

    def _chain_to_root(self, frame: str) -> list[str]:
        chain = [frame]
        while frame in self._edges:
            frame = self._edges[frame][0]
            if frame in chain:
                raise TransformError(f"frame tree has a loop through '{frame}'")
            chain.append(frame)
        return chain

    def _edge_at(self, child: str, stamp: float) -> np.ndarray:
        parent, edge = self._edges[child]
        T = np.eye(4)
        if edge.static:
            T[:3, :3] = rotation_from_quaternion(*edge.quaternions[0])
            T[:3, 3] = edge.translations[0]
            return T
        stamps = edge.stamps
        if stamp == 0.0:
            stamp = stamps[-1]
        if stamp < stamps[0] or stamp > stamps[-1]:
            raise TransformError(
                f"no transform {parent} -> {child} at t={stamp:.3f} (have {stamps[0]:.3f}..{stamps[-1]:.3f});"
                f" would need extrapolation")
        index = bisect.bisect_left(stamps, stamp)
        if stamps[index] == stamp:
            translation, quaternion = edge.translations[index], edge.quaternions[index]
        else:
            t0, t1 = stamps[index - 1], stamps[index]
            weight = (stamp - t0) / (t1 - t0)
            translation = (1 - weight) * edge.translations[index - 1] + weight * edge.translations[index]
            quaternion = _slerp(edge.quaternions[index - 1], edge.quaternions[index], weight)
        T[:3, :3] = rotation_from_quaternion(*quaternion)
        T[:3, 3] = translation
        return T

    def lookup(self, target: str, source: str, stamp: float = 0.0) -> np.ndarray:
        """4x4 target_T_source at `stamp` (seconds; 0 = latest available on every edge)."""
        target, source = target.lstrip("/"), source.lstrip("/")
        if target == source:
            return np.eye(4)
        with self._lock:
            if target not in self._edges and not any(parent == target for parent, _ in self._edges.values()):
                raise TransformError(f"frame '{target}' does not exist")
            if source not in self._edges and not any(parent == source for parent, _ in self._edges.values()):
                raise TransformError(f"frame '{source}' does not exist")
            source_chain, target_chain = self._chain_to_root(source), self._chain_to_root(target)
            common = next((frame for frame in source_chain if frame in target_chain), None)
            if common is None:
                raise TransformError(f"frames '{target}' and '{source}' are not connected")
            root_T_source = np.eye(4)
            for child in source_chain[:source_chain.index(common)]:
                root_T_source = self._edge_at(child, stamp) @ root_T_source
            root_T_target = np.eye(4)
            for child in target_chain[:target_chain.index(common)]:
                root_T_target = self._edge_at(child, stamp) @ root_T_target
        return np.linalg.inv(root_T_target) @ root_T_source

    def frames(self) -> set[str]:
        with self._lock:
            return set(self._edges) | {parent for parent, _ in self._edges.values()}

    def set_transform_msg(self, msg, static: bool) -> None:
        """Store a geometry_msgs/TransformStamped."""
        stamp = msg.header.stamp.sec + msg.header.stamp.nanosec * 1e-9
        t, q = msg.transform.translation, msg.transform.rotation
        self.set_transform(msg.header.frame_id, msg.child_frame_id, stamp, (t.x, t.y, t.z), (q.x, q.y, q.z, q.w),
                           static=static)


def transform_msgs_from_matrix(T: np.ndarray):
    """(Vector3, Quaternion) message pair of a 4x4 transform, for TransformStamped."""
    from geometry_msgs.msg import Quaternion, Vector3

    x, y, z, w = quaternion_from_rotation(T[:3, :3])
    return Vector3(x=float(T[0, 3]), y=float(T[1, 3]), z=float(T[2, 3])), Quaternion(x=x, y=y, z=z, w=w)


class TfListener:
    """Subscribes /tf and /tf_static on `node` and fills a TransformBuffer."""

    def __init__(self, node, buffer: TransformBuffer, callback_group=None):
        from rclpy.qos import DurabilityPolicy, HistoryPolicy, QoSProfile, ReliabilityPolicy
        from tf2_msgs.msg import TFMessage

        self.buffer = buffer
        self.rejected = defaultdict(int)
        self._node = node
        dynamic_qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST)
        static_qos = QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE, history=HistoryPolicy.KEEP_LAST,
                                durability=DurabilityPolicy.TRANSIENT_LOCAL)
        node.create_subscription(TFMessage, "/tf", lambda m: self._on_message(m, False), dynamic_qos,
                                 callback_group=callback_group)
        node.create_subscription(TFMessage, "/tf_static", lambda m: self._on_message(m, True), static_qos,
                                 callback_group=callback_group)

    def _on_message(self, message, static: bool) -> None:
        for transform in message.transforms:
            try:
                self.buffer.set_transform_msg(transform, static)
            except TransformError as error:
                self.rejected[str(error)] += 1
                self._node.get_logger().warning(f"dropped transform: {error}", throttle_duration_sec=5.0)
