"""instascene_segmenter: a 2D instance segmenter feeding the mapper through a topic.

image (+ depth + camera_info) in, `~/mask` (32SC1, the image's header) out, like any external
segmenter would; the mapper pairs masks with images by stamp. Backend by parameter:
`geometric` (default with depth: support plane + region growing), `classical` (no depth),
`salient` (shipped u2netp), `onnx` (bring-your-own SAM weights: `onnx_encoder` / `onnx_decoder`
local paths; a missing file is a startup error). The support plane is published on
`~/support_plane` (a flat marker in the camera frame) for RViz. Work is rate-limited
(`max_rate_hz`): a real segmenter runs at about 1 Hz on a CPU, and the mapper waits for late masks.
"""
from __future__ import annotations

import threading
import time

import numpy as np
from rcl_interfaces.msg import ParameterDescriptor
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from sensor_msgs.msg import CameraInfo, Image
from visualization_msgs.msg import Marker

from instascene_ros.ros.conversions import MessageError, depth_from_image, numpy_to_image, rgb_from_image
from instascene_ros.ros.frame_input import intrinsics_from_camera_info, stamp_seconds
from instascene_ros.ros.node_main import run_node
from instascene_ros.ros.sync import ApproximateSync, SyncConfig

RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)

PARAMETERS = {
    "backend": ("geometric", "geometric (depth), classical, salient or onnx"),
    "use_depth": (True, "pair images with depth (needed by the geometric backend)"),
    "max_rate_hz": (1.0, "segment at most this often; images in between are skipped"),
    "sync_slop_s": (0.02, "max stamp difference between image, depth and camera_info"),
    "onnx_encoder": ("", "onnx backend: local path of the SAM-family image encoder"),
    "onnx_decoder": ("", "onnx backend: local path of the SAM-family mask decoder"),
    "min_region_fraction": (0.001, "regions smaller than this share of the image are dropped"),
}


class SegmenterNode(Node):
    def __init__(self):
        super().__init__("instascene_segmenter")
        values = {name: self.declare_parameter(name, default, ParameterDescriptor(description=text, read_only=True)).value
                  for name, (default, text) in PARAMETERS.items()}
        self.values = values
        self.segmenter = self._build(values)
        self.drops = 0
        self._last_time = 0.0
        self._busy = threading.Lock()
        required = ["camera_info"] + (["depth"] if values["use_depth"] else [])
        self.sync = ApproximateSync(required, [], self._on_synced, self._on_drop,
                                    SyncConfig(slop_s=values["sync_slop_s"], max_wait_s=0.5))
        sensor = qos_profile_sensor_data
        self.create_subscription(Image, "image", lambda m: self.sync.add_image(stamp_seconds(m.header.stamp), m), sensor)
        self.create_subscription(CameraInfo, "camera_info",
                                 lambda m: self.sync.add("camera_info", stamp_seconds(m.header.stamp), m), sensor)
        if values["use_depth"]:
            self.create_subscription(Image, "depth", lambda m: self.sync.add("depth", stamp_seconds(m.header.stamp), m),
                                     sensor)
        self.pub_mask = self.create_publisher(Image, "~/mask", RELIABLE)
        self.pub_plane = self.create_publisher(Marker, "~/support_plane", RELIABLE)
        self.get_logger().info(f"ready: backend={self.segmenter.name}, at most {values['max_rate_hz']} Hz")

    def _build(self, values):
        from instascene_ros.core.segment2d import make_segmenter

        backend = values["backend"]
        config = None
        if backend == "onnx":
            config = {"encoder_path": values["onnx_encoder"], "decoder_path": values["onnx_decoder"]}
        elif backend == "geometric":
            config = {"min_region_fraction": values["min_region_fraction"]}
        return make_segmenter(backend, config)

    def _on_drop(self, reason: str) -> None:
        self.drops += 1
        self.get_logger().warning(f"dropped: {reason}", throttle_duration_sec=5.0)

    def _on_synced(self, synced) -> None:
        now = time.monotonic()
        if now - self._last_time < 1.0 / max(self.values["max_rate_hz"], 1e-6) or not self._busy.acquire(blocking=False):
            return  # rate limit: the mapper maps mask-less frames too
        self._last_time = now
        try:
            self._segment(synced)
        finally:
            self._busy.release()

    def _segment(self, synced) -> None:
        info = synced.others["camera_info"]
        try:
            rgb = rgb_from_image(synced.image)
            depth = depth_from_image(synced.others["depth"]) if "depth" in synced.others else None
        except MessageError as error:
            self._on_drop(str(error))
            return
        K = intrinsics_from_camera_info(info)
        if hasattr(self.segmenter, "segment_with_plane") and depth is not None:
            result = self.segmenter.segment_with_plane(depth, K)
            labels, plane = result.labels, result.plane
        else:
            labels, plane = self.segmenter.segment(rgb, depth, K), None
        self.pub_mask.publish(numpy_to_image(labels.astype(np.int32), "32SC1", header=synced.image.header))
        if plane is not None:
            self.pub_plane.publish(self._plane_marker(plane, synced.image.header))

    @staticmethod
    def _plane_marker(plane, header) -> Marker:
        from instascene_ros.ros.messages import plane_marker

        normal = np.asarray(plane.normal, float)
        centre = -plane.offset * normal  # the plane point nearest the camera origin
        return plane_marker(header, normal, centre, 1.0, "support_plane")


def main(args=None) -> int:
    from instascene_ros.core.segment2d import SegmenterConfigError

    return run_node(SegmenterNode, "instascene_segmenter", (SegmenterConfigError,), num_threads=2, args=args)


if __name__ == "__main__":
    import sys
    sys.exit(main())
