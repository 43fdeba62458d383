"""Building the node's output messages from core results (PointCloud2, markers, diagnostics).

sensor_msgs_py is not installable here, so PointCloud2 packing is ours: fields x, y, z (float32),
rgb (float32 holding packed 0x00RRGGBB, the layout RViz's RGB8 colour transformer reads) and
instance (uint32), little-endian, dense rows.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
from diagnostic_msgs.msg import DiagnosticArray, DiagnosticStatus, KeyValue
from geometry_msgs.msg import Point
from sensor_msgs.msg import PointCloud2, PointField
from std_msgs.msg import ColorRGBA
from visualization_msgs.msg import Marker, MarkerArray

CLOUD_DTYPE = np.dtype([("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("rgb", "<f4"), ("instance", "<u4")])


def pack_rgb(colors_uint8: np.ndarray) -> np.ndarray:
    """(N, 3) uint8 -> (N,) float32 whose bits are 0x00RRGGBB."""
    colors = np.asarray(colors_uint8, dtype=np.uint32)
    packed = (colors[:, 0] << 16) | (colors[:, 1] << 8) | colors[:, 2]
    return packed.astype(np.uint32).view(np.float32)


def unpack_rgb(packed: np.ndarray) -> np.ndarray:
    bits = np.asarray(packed, dtype=np.float32).view(np.uint32)
    return np.stack([(bits >> 16) & 255, (bits >> 8) & 255, bits & 255], axis=1).astype(np.uint8)


def make_cloud(header, points: np.ndarray, colors_uint8: np.ndarray, instance_ids: np.ndarray) -> PointCloud2:
    """A PointCloud2 with x, y, z, rgb, instance for N points."""
    count = int(points.shape[0])
    records = np.empty(count, dtype=CLOUD_DTYPE)
    records["x"], records["y"], records["z"] = points[:, 0], points[:, 1], points[:, 2]
    records["rgb"] = pack_rgb(colors_uint8) if count else np.zeros(0, np.float32)
    records["instance"] = instance_ids
    msg = PointCloud2()
    msg.header = header
    msg.height, msg.width = 1, count
    msg.fields = [
        PointField(name="x", offset=0, datatype=PointField.FLOAT32, count=1),
        PointField(name="y", offset=4, datatype=PointField.FLOAT32, count=1),
        PointField(name="z", offset=8, datatype=PointField.FLOAT32, count=1),
        PointField(name="rgb", offset=12, datatype=PointField.FLOAT32, count=1),
        PointField(name="instance", offset=16, datatype=PointField.UINT32, count=1),
    ]
    msg.is_bigendian = False
    msg.point_step = CLOUD_DTYPE.itemsize
    msg.row_step = msg.point_step * count
    msg.is_dense = True
    msg.data = records.tobytes()
    return msg


def read_cloud(msg: PointCloud2) -> np.ndarray:
    """Structured array of a cloud made by `make_cloud` (used by tests and the demo)."""
    names = [field.name for field in msg.fields]
    if names != list(CLOUD_DTYPE.names) or msg.point_step != CLOUD_DTYPE.itemsize:
        raise ValueError(f"cloud layout {names} / step {msg.point_step} is not instascene's")
    return np.frombuffer(bytes(msg.data), dtype=CLOUD_DTYPE, count=msg.width * msg.height)


def color_msg(rgb_uint8: Sequence[int], alpha: float = 1.0) -> ColorRGBA:
    return ColorRGBA(r=rgb_uint8[0] / 255.0, g=rgb_uint8[1] / 255.0, b=rgb_uint8[2] / 255.0, a=float(alpha))


def plane_marker(header, normal, centre, size: float, namespace: str) -> Marker:
    """A thin translucent grey square of side `size` in the plane through `centre` with `normal`."""
    from instascene_ros.ros.conversions import pose_from_matrix

    z = np.asarray(normal, float) / np.linalg.norm(normal)
    x = np.cross([0.0, 1.0, 0.0], z)
    x = x / np.linalg.norm(x) if np.linalg.norm(x) > 1e-6 else np.array([1.0, 0.0, 0.0])
    T = np.eye(4)
    T[:3, :3] = np.stack([x, np.cross(z, x), z], axis=1)
    T[:3, 3] = centre
    marker = Marker(header=header, ns=namespace, id=0, type=Marker.CUBE, action=Marker.ADD)
    marker.pose = pose_from_matrix(T)
    marker.scale.x = marker.scale.y = float(size)
    marker.scale.z = 0.002
    marker.color.r, marker.color.g, marker.color.b, marker.color.a = 0.6, 0.6, 0.6, 0.4
    return marker


def instance_markers(header, instances: Iterable, namespace: str = "instances", box_alpha: float = 0.35,
                     table=None) -> MarkerArray:
    """One translucent box and one id label per instance, after a DELETEALL so forgotten ones vanish;
    with `table` (a core.support_plane.TablePlane), the table the instance masks read as
    background, as a square under the instances (at least 0.5 m, 1.5x their footprint).

    `instances` items need `id`, `color` (uint8 RGB), `bbox_min`, `bbox_max` (world, metres).
    """
    instances = list(instances)
    markers = MarkerArray()
    clear = Marker()
    clear.header = header
    clear.action = Marker.DELETEALL
    markers.markers.append(clear)
    if table is not None and instances:
        corners = np.array([corner for item in instances for corner in (item.bbox_min, item.bbox_max)], float)
        middle = corners.mean(axis=0)
        centre = middle - table.height(middle) * table.normal  # its foot on the plane
        size = max(0.5, 1.5 * float(np.linalg.norm(np.ptp(corners, axis=0))))
        markers.markers.append(plane_marker(header, table.normal, centre, size, f"{namespace}/table"))
    for instance in instances:
        lo, hi = np.asarray(instance.bbox_min, float), np.asarray(instance.bbox_max, float)
        centre, size = (lo + hi) / 2.0, np.maximum(hi - lo, 1e-3)
        box = Marker()
        box.header, box.ns, box.id, box.type, box.action = header, f"{namespace}/boxes", int(instance.id), Marker.CUBE, Marker.ADD
        box.pose.position = Point(x=float(centre[0]), y=float(centre[1]), z=float(centre[2]))
        box.pose.orientation.w = 1.0
        box.scale.x, box.scale.y, box.scale.z = (float(v) for v in size)
        box.color = color_msg(instance.color, box_alpha)
        label = Marker()
        label.header, label.ns, label.id, label.type, label.action = header, f"{namespace}/labels", int(instance.id), Marker.TEXT_VIEW_FACING, Marker.ADD
        label.pose.position = Point(x=float(centre[0]), y=float(centre[1]), z=float(hi[2] + 0.02))
        label.pose.orientation.w = 1.0
        label.scale.z = 0.03
        label.color = color_msg(instance.color, 1.0)
        label.text = f"{instance.id}" + (f" {instance.label}" if getattr(instance, "label", "") else "")
        markers.markers.extend([box, label])
    return markers


def diagnostics(header, node_name: str, level_ok: bool, message: str, values: dict) -> DiagnosticArray:
    """A DiagnosticArray with one status whose key/values are the node's counters and timings."""
    status = DiagnosticStatus()
    status.level = DiagnosticStatus.OK if level_ok else DiagnosticStatus.WARN
    status.name = f"{node_name}: mapping"
    status.hardware_id = node_name
    status.message = message
    status.values = [KeyValue(key=str(key), value=f"{value:.4g}" if isinstance(value, float) else str(value))
                     for key, value in values.items()]
    array = DiagnosticArray()
    array.header = header
    array.status = [status]
    return array
