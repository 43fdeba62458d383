"""Smoke-test peer 1: publishes a known image stream and serves GetCompletedObject.

The answer is a placeholder tetrahedron: this checks the plumbing (our rosidl-built service
type over real DDS between processes), not completion.
"""
import sys

import numpy as np
import rclpy
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data

from instascene_ros.ros.conversions import mesh_to_msg, numpy_to_image, pose_from_matrix
from instascene_ros.ros.node_main import spin_until_shutdown
from instascene_ros.srv import GetCompletedObject
from sensor_msgs.msg import Image

TETRAHEDRON_VERTICES = np.array([[0, 0, 0], [0.1, 0, 0], [0, 0.1, 0], [0, 0, 0.1]], float)
TETRAHEDRON_FACES = np.array([[0, 2, 1], [0, 1, 3], [0, 3, 2], [1, 2, 3]])


def pattern(index: int, height: int = 48, width: int = 64) -> np.ndarray:
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([(rows * 5 + index) % 256, (cols * 3) % 256, np.full_like(rows, index % 256)], -1).astype(np.uint8)


class SmokeServer(Node):
    def __init__(self):
        super().__init__("smoke_server")
        self.publisher = self.create_publisher(Image, "camera/image", qos_profile_sensor_data)
        self.index = 0
        self.create_timer(0.05, self.publish_image)
        self.create_service(GetCompletedObject, "get_completed_object", self.complete)

    def publish_image(self):
        header = self.get_clock().now().to_msg()
        msg = numpy_to_image(pattern(self.index), "rgb8")
        msg.header.stamp = header
        msg.header.frame_id = f"camera_{self.index}"
        self.publisher.publish(msg)
        self.index += 1

    def complete(self, request, response):
        if request.instance_id != 7:
            response.success = False
            response.message = f"unknown instance {request.instance_id}"
            return response
        response.success = True
        response.message = "placeholder: not completed"
        response.object.instance_id = request.instance_id
        response.object.header.frame_id = "world"
        response.object.mesh = mesh_to_msg(TETRAHEDRON_VERTICES, TETRAHEDRON_FACES)
        T = np.eye(4)
        T[:3, 3] = [0.5, -0.2, 0.75]
        response.object.pose = pose_from_matrix(T)
        response.object.generator = request.generator or "none"
        return response


def main():
    rclpy.init()
    node = SmokeServer()
    # The executor exists before READY: a SIGINT right after READY shuts the context down, and an
    # executor created after that fails (rclpy.spin creating one raced with the test's signal).
    executor = SingleThreadedExecutor()
    executor.add_node(node)
    try:
        print("READY", flush=True)  # inside the try: the test may send SIGINT right after reading it
        spin_until_shutdown(executor)
    except KeyboardInterrupt:
        pass
    finally:
        node.destroy_node()
        rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
