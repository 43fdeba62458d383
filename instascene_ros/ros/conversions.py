"""numpy <-> ROS message conversions (cv_bridge and sensor_msgs_py are not installable here).

Every decoder validates before it copies: a message whose encoding, width, height and step
disagree with its data length raises `MessageError` naming the inconsistency, so a node can
drop and count it instead of dying or mapping garbage.
"""
from __future__ import annotations

import numpy as np
from geometry_msgs.msg import Point, Pose, Quaternion, Vector3
from sensor_msgs.msg import Image
from shape_msgs.msg import Mesh, MeshTriangle

# encoding -> (numpy dtype, channels)
IMAGE_ENCODINGS: dict[str, tuple[np.dtype, int]] = {
    "rgb8": (np.dtype(np.uint8), 3),
    "bgr8": (np.dtype(np.uint8), 3),
    "rgba8": (np.dtype(np.uint8), 4),
    "bgra8": (np.dtype(np.uint8), 4),
    "mono8": (np.dtype(np.uint8), 1),
    "mono16": (np.dtype(np.uint16), 1),
    "16UC1": (np.dtype(np.uint16), 1),
    "32SC1": (np.dtype(np.int32), 1),
    "32FC1": (np.dtype(np.float32), 1),
}


class MessageError(ValueError):
    """A message that cannot be decoded; the text says why (it becomes the drop reason)."""


def image_to_numpy(msg: Image) -> np.ndarray:
    """Decode an Image to (H, W) or (H, W, C) in the message's own encoding and channel order."""
    if msg.encoding not in IMAGE_ENCODINGS:
        raise MessageError(f"unsupported image encoding '{msg.encoding}' "
                           f"(supported: {', '.join(sorted(IMAGE_ENCODINGS))})")
    dtype, channels = IMAGE_ENCODINGS[msg.encoding]
    if msg.width == 0 or msg.height == 0:
        raise MessageError(f"image is empty ({msg.width}x{msg.height})")
    row_bytes = msg.width * channels * dtype.itemsize
    if msg.step < row_bytes:
        raise MessageError(f"step {msg.step} is smaller than width*channels*itemsize = {row_bytes}")
    if len(msg.data) != msg.step * msg.height:
        raise MessageError(f"data length {len(msg.data)} != step {msg.step} x height {msg.height}")
    buffer = np.frombuffer(bytes(msg.data), dtype=np.uint8).reshape(msg.height, msg.step)[:, :row_bytes]
    big_endian_data = bool(msg.is_bigendian)
    array = buffer.copy().view(dtype.newbyteorder(">" if big_endian_data else "<"))
    array = array.astype(dtype, copy=False).reshape(msg.height, msg.width, channels)
    return array[..., 0] if channels == 1 else array


def numpy_to_image(array: np.ndarray, encoding: str, header=None) -> Image:
    """Encode an array as an Image. `tobytes()` keeps this fast (assigning an ndarray is ~80 ms)."""
    if encoding not in IMAGE_ENCODINGS:
        raise MessageError(f"unsupported image encoding '{encoding}'")
    dtype, channels = IMAGE_ENCODINGS[encoding]
    array = np.ascontiguousarray(array, dtype=dtype)
    if (channels == 1 and array.ndim != 2) or (channels > 1 and (array.ndim != 3 or array.shape[2] != channels)):
        raise MessageError(f"array of shape {array.shape} does not fit encoding {encoding}")
    msg = Image()
    if header is not None:
        msg.header = header
    msg.height, msg.width = int(array.shape[0]), int(array.shape[1])
    msg.encoding = encoding
    msg.is_bigendian = 0
    msg.step = msg.width * channels * dtype.itemsize
    msg.data = array.tobytes()
    return msg


def rgb_from_image(msg: Image) -> np.ndarray:
    """Decode a colour image to (H, W, 3) uint8 RGB, whatever its colour encoding."""
    array = image_to_numpy(msg)
    if msg.encoding == "rgb8":
        return array
    if msg.encoding == "bgr8":
        return array[..., ::-1].copy()
    if msg.encoding == "rgba8":
        return array[..., :3].copy()
    if msg.encoding == "bgra8":
        return array[..., 2::-1].copy()
    if msg.encoding == "mono8":
        return np.repeat(array[..., None], 3, axis=2)
    raise MessageError(f"encoding '{msg.encoding}' is not a colour image")


def depth_from_image(msg: Image) -> np.ndarray:
    """Decode a depth image to (H, W) float32 metres: 32FC1 metres or 16UC1/mono16 millimetres."""
    array = image_to_numpy(msg)
    if msg.encoding == "32FC1":
        return array.astype(np.float32, copy=False)
    if msg.encoding in ("16UC1", "mono16"):
        return array.astype(np.float32) * np.float32(1e-3)
    raise MessageError(f"encoding '{msg.encoding}' is not a depth image (use 32FC1 metres or 16UC1 mm)")


def mask_from_image(msg: Image) -> np.ndarray:
    """Decode an instance-id image (32SC1 or mono16/16UC1) to (H, W) int32."""
    array = image_to_numpy(msg)
    if msg.encoding in ("32SC1", "mono16", "16UC1"):
        return array.astype(np.int32, copy=False)
    raise MessageError(f"encoding '{msg.encoding}' is not an instance mask (use 32SC1 or mono16)")


def pose_from_matrix(T: np.ndarray) -> Pose:
    """A 4x4 rigid transform as geometry_msgs/Pose."""
    qx, qy, qz, qw = quaternion_from_rotation(T[:3, :3])
    return Pose(position=Point(x=float(T[0, 3]), y=float(T[1, 3]), z=float(T[2, 3])),
                orientation=Quaternion(x=qx, y=qy, z=qz, w=qw))


def matrix_from_pose(position, orientation) -> np.ndarray:
    """4x4 transform from a position (x, y, z attributes) and an orientation quaternion."""
    T = np.eye(4)
    T[:3, :3] = rotation_from_quaternion(orientation.x, orientation.y, orientation.z, orientation.w)
    T[:3, 3] = [position.x, position.y, position.z]
    return T


def quaternion_from_rotation(R: np.ndarray) -> tuple[float, float, float, float]:
    """(x, y, z, w) of a rotation matrix; Shepperd's method keeps it stable near 180 degrees."""
    trace = np.trace(R)
    if trace > 0:
        s = 2.0 * np.sqrt(trace + 1.0)
        w, x, y, z = 0.25 * s, (R[2, 1] - R[1, 2]) / s, (R[0, 2] - R[2, 0]) / s, (R[1, 0] - R[0, 1]) / s
    elif R[0, 0] > R[1, 1] and R[0, 0] > R[2, 2]:
        s = 2.0 * np.sqrt(1.0 + R[0, 0] - R[1, 1] - R[2, 2])
        w, x, y, z = (R[2, 1] - R[1, 2]) / s, 0.25 * s, (R[0, 1] + R[1, 0]) / s, (R[0, 2] + R[2, 0]) / s
    elif R[1, 1] > R[2, 2]:
        s = 2.0 * np.sqrt(1.0 + R[1, 1] - R[0, 0] - R[2, 2])
        w, x, y, z = (R[0, 2] - R[2, 0]) / s, (R[0, 1] + R[1, 0]) / s, 0.25 * s, (R[1, 2] + R[2, 1]) / s
    else:
        s = 2.0 * np.sqrt(1.0 + R[2, 2] - R[0, 0] - R[1, 1])
        w, x, y, z = (R[1, 0] - R[0, 1]) / s, (R[0, 2] + R[2, 0]) / s, (R[1, 2] + R[2, 1]) / s, 0.25 * s
    norm = np.sqrt(w * w + x * x + y * y + z * z)
    return float(x / norm), float(y / norm), float(z / norm), float(w / norm)


def rotation_from_quaternion(x: float, y: float, z: float, w: float) -> np.ndarray:
    """Rotation matrix of a (not necessarily normalised) quaternion; raises on a zero quaternion."""
    norm = np.sqrt(x * x + y * y + z * z + w * w)
    if not np.isfinite(norm) or norm < 1e-9:
        raise MessageError("orientation quaternion is zero or not finite")
    x, y, z, w = x / norm, y / norm, z / norm, w / norm
    return np.array([
        [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
        [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
        [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
    ])


def mesh_to_msg(vertices: np.ndarray, faces: np.ndarray) -> Mesh:
    """(V, 3) vertices and (F, 3) vertex indices as shape_msgs/Mesh."""
    msg = Mesh()
    msg.vertices = [Point(x=float(x), y=float(y), z=float(z)) for x, y, z in np.asarray(vertices, float)]
    msg.triangles = [MeshTriangle(vertex_indices=[int(a), int(b), int(c)]) for a, b, c in np.asarray(faces)]
    return msg


def mesh_from_msg(msg: Mesh) -> tuple[np.ndarray, np.ndarray]:
    vertices = np.array([[p.x, p.y, p.z] for p in msg.vertices], dtype=np.float64).reshape(-1, 3)
    faces = np.array([list(t.vertex_indices) for t in msg.triangles], dtype=np.int64).reshape(-1, 3)
    return vertices, faces


def vector3(values) -> Vector3:
    return Vector3(x=float(values[0]), y=float(values[1]), z=float(values[2]))
