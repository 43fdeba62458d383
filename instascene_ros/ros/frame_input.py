"""Turning synchronised ROS messages into a validated core `Frame` (or a named drop reason).

Everything that can be wrong with input is checked here, before the mapper sees it: encodings,
sizes, camera_info, distortion model, pose availability and finiteness, image size limits. The
result is either a Frame or a `DropReason`, which the node logs (throttled) and counts in
diagnostics; nothing in the map is touched by a bad message.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from instascene_ros.core.camera import Camera, Frame, InvalidFrameError
from instascene_ros.core.undistort import Rectifier, UnsupportedDistortion
from instascene_ros.ros.conversions import MessageError, depth_from_image, mask_from_image, rgb_from_image
from instascene_ros.ros.tf_buffer import TransformError


class DropReason(Exception):
    """A message pair that is dropped; `key` is the diagnostics counter, the text the log line."""

    def __init__(self, key: str, detail: str):
        super().__init__(f"{key}: {detail}")
        self.key, self.detail = key, detail


@dataclass(frozen=True)
class InputLimits:
    max_image_pixels: int = 1920 * 1080  # larger images are dropped (memory / latency guard)


def stamp_seconds(stamp) -> float:
    return stamp.sec + stamp.nanosec * 1e-9


def decode_compressed(msg) -> np.ndarray:
    """sensor_msgs/CompressedImage (png/jpeg) -> (H, W, 3) uint8 RGB."""
    import io

    from PIL import Image as PILImage

    try:
        with PILImage.open(io.BytesIO(bytes(msg.data))) as image:
            return np.asarray(image.convert("RGB"))
    except Exception as error:  # PIL raises many types for corrupt data
        raise MessageError(f"compressed image ({msg.format}) does not decode: {error}") from error


class FrameAssembler:
    """Builds Frames from (image, camera_info, depth?, mask?) with a pose lookup.

    `lookup_pose(frame_id, stamp) -> 4x4 T_world_cam` raises TransformError when unavailable.
    """

    def __init__(self, lookup_pose: Callable[[str, float], np.ndarray], limits: InputLimits = InputLimits(),
                 self_filter: Optional[np.ndarray] = None):
        self.lookup_pose = lookup_pose
        self.limits = limits
        # (H, W) bool: pixels that show the robot itself. They give no depth (no Gaussians are
        # seeded on the arm) and no mask (the arm never becomes an instance).
        self.self_filter = self_filter
        self._rectifiers: dict[tuple, Rectifier] = {}

    def _rectifier(self, info) -> Rectifier:
        key = (info.distortion_model, tuple(info.d), tuple(info.k), info.width, info.height)
        if key not in self._rectifiers:
            K = intrinsics_from_camera_info(info)
            self._rectifiers.clear()  # one camera per node: keep a single cached map
            self._rectifiers[key] = Rectifier(K, info.width, info.height, info.distortion_model, np.asarray(info.d))
        return self._rectifiers[key]

    def camera_from_info(self, info, T_world_cam: np.ndarray) -> Camera:
        K = intrinsics_from_camera_info(info)
        if not np.all(np.isfinite(K)) or K[0, 0] <= 0 or K[1, 1] <= 0:
            raise DropReason("bad_camera_info", f"camera_info has non-positive or non-finite focal length "
                                                 f"(fx={K[0, 0]}, fy={K[1, 1]})")
        if info.width == 0 or info.height == 0:
            raise DropReason("bad_camera_info", f"camera_info size is {info.width}x{info.height}")
        return Camera(K=K, width=int(info.width), height=int(info.height), T_world_cam=T_world_cam)

    def assemble(self, image_msg, info_msg, depth_msg=None, mask_msg=None) -> Frame:
        """Return a validated Frame or raise DropReason."""
        stamp = stamp_seconds(image_msg.header.stamp)
        try:
            rgb = decode_compressed(image_msg) if hasattr(image_msg, "format") else rgb_from_image(image_msg)
        except MessageError as error:
            raise DropReason("bad_image", str(error)) from error
        if rgb.shape[0] * rgb.shape[1] > self.limits.max_image_pixels:
            raise DropReason("image_too_large", f"{rgb.shape[1]}x{rgb.shape[0]} exceeds max_image_pixels="
                                                f"{self.limits.max_image_pixels}")
        frame_id = image_msg.header.frame_id or info_msg.header.frame_id
        if not frame_id:
            raise DropReason("no_frame_id", "image header has no frame_id to look the camera pose up with")
        try:
            T_world_cam = self.lookup_pose(frame_id, stamp)
        except TransformError as error:
            raise DropReason("no_pose", str(error)) from error
        camera = self.camera_from_info(info_msg, np.asarray(T_world_cam, float))
        if (rgb.shape[1], rgb.shape[0]) != (camera.width, camera.height):
            raise DropReason("size_mismatch", f"image {rgb.shape[1]}x{rgb.shape[0]} vs camera_info "
                                              f"{camera.width}x{camera.height}")
        try:
            rectifier = self._rectifier(info_msg)
        except UnsupportedDistortion as error:
            raise DropReason("unsupported_distortion", str(error)) from error
        depth = mask = None
        try:
            if depth_msg is not None:
                depth = rectifier.rectify_depth(depth_from_image(depth_msg))
            if mask_msg is not None:
                mask = rectifier.rectify_mask(mask_from_image(mask_msg))
        except MessageError as error:
            raise DropReason("bad_depth_or_mask", str(error)) from error
        if self.self_filter is not None:
            if self.self_filter.shape != rgb.shape[:2]:
                raise DropReason("self_filter_size", f"self_filter_mask is {self.self_filter.shape[1]}x"
                                                     f"{self.self_filter.shape[0]}, image {rgb.shape[1]}x{rgb.shape[0]}")
            if depth is not None:
                depth = np.where(self.self_filter, 0.0, depth).astype(np.float32)
            if mask is not None:
                mask = np.where(self.self_filter, 0, mask).astype(np.int32)
        frame = Frame(rgb=rectifier.rectify_color(rgb), camera=camera, stamp=stamp, depth=depth, mask=mask,
                      name=f"{stamp:.6f}")
        try:
            frame.validate()
        except InvalidFrameError as error:
            raise DropReason("invalid_frame", str(error)) from error
        return frame


def intrinsics_from_camera_info(info) -> np.ndarray:
    """Our K (pixel centres at +0.5) from a camera_info K (ROS/OpenCV: pixel centres at integers).

    A centred ROS camera has cx = (W - 1) / 2; ours has cx = W / 2. Forgetting this half pixel
    shifts every projection by 0.5 px, which the boundary metrics notice.
    """
    K = np.asarray(info.k, float).reshape(3, 3).copy()
    K[0, 2] += 0.5
    K[1, 2] += 0.5
    return K


def camera_info_intrinsics(K: np.ndarray) -> list[float]:
    """The inverse of `intrinsics_from_camera_info`: a camera_info `k` list from our K."""
    K_ros = np.asarray(K, float).copy()
    K_ros[0, 2] -= 0.5
    K_ros[1, 2] -= 0.5
    return [float(v) for v in K_ros.reshape(-1)]


def pose_lookup_from_tf(buffer, global_frame: str) -> Callable[[str, float], np.ndarray]:
    """Camera pose T_world_cam from TF: global_frame <- camera optical frame at the image stamp."""
    def lookup(frame_id: str, stamp: float) -> np.ndarray:
        return buffer.lookup(global_frame, frame_id, stamp)
    return lookup


class PoseTopicLookup:
    """Camera pose from a geometry_msgs/PoseStamped topic: the nearest pose within `max_gap_s`."""

    def __init__(self, global_frame: str, max_gap_s: float = 0.05, history: int = 200):
        from collections import deque
        self.global_frame = global_frame
        self.max_gap_s = max_gap_s
        self._poses = deque(maxlen=history)

    def add(self, msg) -> None:
        from instascene_ros.ros.conversions import matrix_from_pose
        if msg.header.frame_id and msg.header.frame_id.lstrip("/") != self.global_frame:
            raise TransformError(f"pose is in '{msg.header.frame_id}', expected global_frame '{self.global_frame}'")
        T = matrix_from_pose(msg.pose.position, msg.pose.orientation)
        if not np.all(np.isfinite(T)):
            raise TransformError("pose contains NaN or inf")
        self._poses.append((stamp_seconds(msg.header.stamp), T))

    def __call__(self, frame_id: str, stamp: float) -> np.ndarray:
        if not self._poses:
            raise TransformError("no pose received yet on the pose topic")
        best_stamp, best = min(self._poses, key=lambda item: abs(item[0] - stamp))
        if abs(best_stamp - stamp) > self.max_gap_s:
            raise TransformError(f"nearest pose is {abs(best_stamp - stamp):.3f} s from the image "
                                 f"(max_gap_s={self.max_gap_s})")
        return best
