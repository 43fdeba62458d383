"""Smoke-test peer 2: receives images, calls GetCompletedObject, prints one JSON line."""
import json
import sys
import time

import rclpy
from rclpy.node import Node
from rclpy.qos import qos_profile_sensor_data

from instascene_ros.ros.conversions import mesh_from_msg, rgb_from_image
from instascene_ros.srv import GetCompletedObject
from sensor_msgs.msg import Image

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from smoke_server import pattern  # noqa: E402  (same folder; the expected pixels)


def main():
    wanted_images = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    rclpy.init()
    node = Node("smoke_client")
    received = []

    def on_image(msg):
        index = int(msg.header.frame_id.split("_")[1])
        rgb = rgb_from_image(msg)
        received.append({"index": index, "exact": bool((rgb == pattern(index)).all())})

    node.create_subscription(Image, "camera/image", on_image, qos_profile_sensor_data)
    client = node.create_client(GetCompletedObject, "get_completed_object")
    deadline = time.monotonic() + 30.0
    while len(received) < wanted_images and time.monotonic() < deadline:
        rclpy.spin_once(node, timeout_sec=0.1)
    result = {"images": received}
    if client.wait_for_service(timeout_sec=max(0.1, deadline - time.monotonic())):
        answers = []
        for instance_id in (7, 8):
            future = client.call_async(GetCompletedObject.Request(instance_id=instance_id, generator="geometric"))
            rclpy.spin_until_future_complete(node, future, timeout_sec=10.0)
            response = future.result()
            vertices, faces = mesh_from_msg(response.object.mesh)
            answers.append({"success": response.success, "message": response.message,
                            "vertices": vertices.tolist(), "faces": faces.tolist(),
                            "position": [response.object.pose.position.x, response.object.pose.position.y,
                                         response.object.pose.position.z],
                            "generator": response.object.generator})
        result["answers"] = answers
    print(json.dumps(result), flush=True)
    node.destroy_node()
    rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
