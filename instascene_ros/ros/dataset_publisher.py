"""Stream a dataset folder as a camera would: image, camera_info, depth, mask topics + /tf.

`instascene publish-dataset DIR --rate HZ [--pose-noise MM,DEG]`. Each training frame is
published with one stamp on every topic; the camera pose goes to /tf as global_frame ->
camera_optical_frame (the image header's frame). Pose noise (a per-frame random translation and
rotation) simulates imperfect robot kinematics. Only input data is published: never `gt_*`.
"""
from __future__ import annotations

import time
from typing import Optional

import numpy as np
import rclpy
from geometry_msgs.msg import TransformStamped
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy, qos_profile_sensor_data
from rosgraph_msgs.msg import Clock
from sensor_msgs.msg import CameraInfo, Image
from tf2_msgs.msg import TFMessage

from instascene_ros.core.pose_refinement import perturb_pose
from instascene_ros.ros.conversions import numpy_to_image
from instascene_ros.ros.frame_input import camera_info_intrinsics
from instascene_ros.ros.tf_buffer import transform_msgs_from_matrix

RELIABLE = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)


class DatasetPublisher(Node):
    def __init__(self, frames, global_frame: str = "world", camera_frame: str = "camera_color_optical_frame",
                 with_depth: bool = True, with_masks: bool = True, publish_clock: bool = False):
        super().__init__("instascene_dataset_publisher")
        self.frames = frames
        self.global_frame, self.camera_frame = global_frame, camera_frame
        self.with_depth, self.with_masks = with_depth, with_masks
        sensor = qos_profile_sensor_data
        self.pub_image = self.create_publisher(Image, "camera/color/image_raw", sensor)
        self.pub_info = self.create_publisher(CameraInfo, "camera/color/camera_info", sensor)
        self.pub_depth = self.create_publisher(Image, "camera/aligned_depth_to_color/image_raw", sensor)
        self.pub_mask = self.create_publisher(Image, "segmenter/mask", RELIABLE)
        self.pub_tf = self.create_publisher(TFMessage, "/tf", QoSProfile(depth=100, reliability=ReliabilityPolicy.RELIABLE))
        self.pub_clock = self.create_publisher(Clock, "/clock", 10) if publish_clock else None
        latched = QoSProfile(depth=1, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
        self.pub_tf_static = self.create_publisher(TFMessage, "/tf_static", latched)

    def publish_frame(self, frame, stamp_msg, T_world_cam: Optional[np.ndarray] = None) -> None:
        T = frame.camera.T_world_cam if T_world_cam is None else T_world_cam
        if self.pub_clock is not None:
            self.pub_clock.publish(Clock(clock=stamp_msg))
        transform = TransformStamped()
        transform.header.stamp, transform.header.frame_id = stamp_msg, self.global_frame
        transform.child_frame_id = self.camera_frame
        transform.transform.translation, transform.transform.rotation = transform_msgs_from_matrix(T)
        self.pub_tf.publish(TFMessage(transforms=[transform]))
        info = CameraInfo()
        info.header.stamp, info.header.frame_id = stamp_msg, self.camera_frame
        info.width, info.height = frame.camera.width, frame.camera.height
        info.k = camera_info_intrinsics(frame.camera.K)
        info.p = [info.k[0], 0.0, info.k[2], 0.0, 0.0, info.k[4], info.k[5], 0.0, 0.0, 0.0, 1.0, 0.0]
        info.r = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0]
        info.distortion_model, info.d = "plumb_bob", [0.0] * 5
        image = numpy_to_image(frame.rgb, "rgb8")
        image.header = info.header
        self.pub_info.publish(info)
        self.pub_image.publish(image)
        if self.with_depth and frame.depth is not None:
            depth = numpy_to_image(np.nan_to_num(frame.depth, nan=0.0, posinf=0.0).astype(np.float32), "32FC1")
            depth.header = info.header
            self.pub_depth.publish(depth)
        if self.with_masks and frame.mask is not None:
            mask = numpy_to_image(frame.mask.astype(np.int32), "32SC1")
            mask.header = info.header
            self.pub_mask.publish(mask)


def publish_dataset(path, rate_hz: float, pose_noise: tuple = (0.0, 0.0), loops: int = 1, with_depth: bool = True,
                    with_masks: bool = True, split: str = "train", seed: int = 0, publish_clock: bool = False,
                    start_delay_s: float = 1.0, log=print) -> int:
    """Publish every frame of `split` at `rate_hz`; returns the number of frames published."""
    from instascene_ros.core.io import load_dataset

    dataset = load_dataset(path)
    frames = [f for f in dataset.frames if split == "all" or f.meta.get("split", "train") == split]
    rng = np.random.default_rng(seed)
    node = DatasetPublisher(frames, with_depth=with_depth, with_masks=with_masks, publish_clock=publish_clock)
    published = 0
    try:
        # Sensor-data QoS is best effort: frames sent before a subscriber is matched are lost.
        deadline = time.monotonic() + max(start_delay_s, 10.0)
        while node.pub_image.get_subscription_count() == 0 and time.monotonic() < deadline:
            rclpy.spin_once(node, timeout_sec=0.1)
        time.sleep(start_delay_s)  # the subscriber's other topics (depth, info) match at about the same time
        start_stamp = node.get_clock().now()
        period = 1.0 / rate_hz
        next_time = time.monotonic()
        for loop in range(loops):
            for frame in frames:
                T = frame.camera.T_world_cam
                if pose_noise[0] > 0 or pose_noise[1] > 0:
                    T = perturb_pose(T, rng, pose_noise[0] / 1000.0, pose_noise[1])
                stamp = (start_stamp + rclpy.duration.Duration(seconds=published * period)).to_msg()
                node.publish_frame(frame, stamp, T)
                published += 1
                rclpy.spin_once(node, timeout_sec=0.0)
                next_time += period
                time.sleep(max(0.0, next_time - time.monotonic()))
        log(f"published {published} frames from {path}")
    finally:
        node.destroy_node()
    return published
