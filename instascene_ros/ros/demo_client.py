"""The demo's manipulation-planner stand-in: waits for the map, then asks for every object.

It watches /diagnostics until the node has mapped the stream and refreshed its instances, then
calls list_instances, get_completed_object for every instance, the complete_object action for one,
and segment_at_pixel; it keeps the last instance overlays. Everything it gets is returned as
plain data for the demo's report.
"""
from __future__ import annotations

import time

import numpy as np
import rclpy
from diagnostic_msgs.msg import DiagnosticArray
from rclpy.action import ActionClient
from rclpy.node import Node
from rclpy.qos import QoSProfile, ReliabilityPolicy
from sensor_msgs.msg import Image

from instascene_ros.action import CompleteObject
from instascene_ros.ros.conversions import image_to_numpy, matrix_from_pose, mesh_from_msg
from instascene_ros.srv import GetCompletedObject, ListInstances, SegmentAtPixel


class DemoClient(Node):
    def __init__(self, node_prefix: str = "/instascene_node"):
        super().__init__("instascene_demo_client")
        self.prefix = node_prefix.rstrip("/")
        self.diagnostics: dict[str, str] = {}
        self.overlays: list[np.ndarray] = []
        reliable = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE)
        self.create_subscription(DiagnosticArray, "/diagnostics", self._on_diagnostics, reliable)
        self.create_subscription(Image, f"{self.prefix}/instance_overlay", self._on_overlay, reliable)
        self.list_client = self.create_client(ListInstances, f"{self.prefix}/list_instances")
        self.complete_client = self.create_client(GetCompletedObject, f"{self.prefix}/get_completed_object")
        self.segment_client = self.create_client(SegmentAtPixel, f"{self.prefix}/segment_at_pixel")
        self.action_client = ActionClient(self, CompleteObject, f"{self.prefix}/complete_object")

    def _on_diagnostics(self, message: DiagnosticArray) -> None:
        for status in message.status:
            if status.hardware_id.endswith("instascene_node"):
                self.diagnostics = {kv.key: kv.value for kv in status.values}

    def _on_overlay(self, message: Image) -> None:
        self.overlays = (self.overlays + [image_to_numpy(message)[..., ::-1].copy()])[-6:]

    def _call(self, client, request, timeout_s: float = 120.0):
        if not client.wait_for_service(timeout_sec=timeout_s):
            raise RuntimeError(f"{client.srv_name} is not available")
        future = client.call_async(request)
        rclpy.spin_until_future_complete(self, future, timeout_sec=timeout_s)
        if not future.done():
            raise RuntimeError(f"{client.srv_name} did not answer within {timeout_s:.0f} s")
        return future.result()

    def value(self, key: str) -> float:
        return float(self.diagnostics.get(key, "nan"))

    def wait_until_mapped(self, frames: int, timeout_s: float, settle_s: float = 30.0, log=print) -> bool:
        """Until `frames` are mapped (or nothing new was mapped for `settle_s`: frames lost on the
        way are counted by the node, not waited for), the queue is empty, and the instances were
        refreshed twice since."""
        deadline, version_then, last_log = time.monotonic() + timeout_s, None, 0.0
        last_mapped, last_change = -1.0, time.monotonic()
        while time.monotonic() < deadline:
            rclpy.spin_once(self, timeout_sec=0.5)
            # frames skipped as already covered by a keyframe count as done
            mapped = self.value("frames_mapped") + (self.value("frames_covered") if "frames_covered" in self.diagnostics
                                                    else 0.0)
            queued = self.value("queue_depth")
            if mapped != last_mapped:
                last_mapped, last_change = mapped, time.monotonic()
            settled = mapped > 0 and time.monotonic() - last_change > settle_s
            if time.monotonic() - last_log > 15:
                log(f"  mapped {mapped:.0f}/{frames} frames, queue {queued:.0f}, "
                    f"{self.value('n_gaussians'):.0f} Gaussians, {self.value('n_instances'):.0f} instances")
                last_log = time.monotonic()
            if version_then is None and (mapped >= frames or settled) and queued == 0:
                version_then = self.value("map_version")
            if version_then is not None and self.value("map_version") >= version_then + 2:
                return True
        return False

    def query_everything(self) -> dict:
        listing = self._call(self.list_client, ListInstances.Request()).instances
        objects = []
        for instance in listing.instances:
            response = self._call(self.complete_client, GetCompletedObject.Request(instance_id=instance.id))
            entry = {"id": instance.id, "success": response.success, "message": response.message,
                     "n_gaussians": instance.n_gaussians, "confidence": instance.confidence}
            if response.success:
                vertices, faces = mesh_from_msg(response.object.mesh)
                pose = matrix_from_pose(response.object.pose.position, response.object.pose.orientation)
                entry.update(vertices_world=vertices @ pose[:3, :3].T + pose[:3, 3], faces=faces,
                             frame_id=response.object.header.frame_id)
            objects.append(entry)
        result = {"map_version": listing.map_version, "objects": objects}
        if listing.instances and self.action_client.wait_for_server(timeout_sec=10.0):
            progress = []
            goal = self.action_client.send_goal_async(CompleteObject.Goal(instance_id=listing.instances[0].id),
                                                      feedback_callback=lambda m: progress.append(m.feedback.progress))
            rclpy.spin_until_future_complete(self, goal, timeout_sec=60.0)
            outcome = goal.result().get_result_async()
            rclpy.spin_until_future_complete(self, outcome, timeout_sec=180.0)
            result["action"] = {"success": outcome.result().result.success,
                                "message": outcome.result().result.message, "feedback": progress}
        return result
