"""Peer for test_bag.py.

`bag_peer.py publish [TF_SUBSCRIBERS]`: publishes a latched /tf_static at once, then, when every topic
has a subscriber (/tf: TF_SUBSCRIBERS of them), known camera frames, a CameraInfo, /tf and an
instascene_ros/InstanceEvent; prints one JSON line when all were acknowledged.
`bag_peer.py listen N_IMAGES LAST_NS`: subscribes like a consumer of `instascene play` (sensor topics,
/tf, latched /tf_static, /clock), prints "ready" on stderr, and one JSON line on stdout with what
arrived, once N_IMAGES images and a /clock >= LAST_NS were seen (or after a timeout).
"""
import json
import sys
import time

import numpy as np
import rclpy
from rclpy.duration import Duration
from rclpy.node import Node
from rclpy.qos import DurabilityPolicy, QoSProfile, ReliabilityPolicy

RELIABLE = QoSProfile(depth=50, reliability=ReliabilityPolicy.RELIABLE)
LATCHED = QoSProfile(depth=10, reliability=ReliabilityPolicy.RELIABLE, durability=DurabilityPolicy.TRANSIENT_LOCAL)
HEIGHT, WIDTH = 120, 160
N_FRAMES = 3
EVENT_TOPIC = "/instascene/events"
BASE_NS, STEP_NS = 10_000_000_000, 100_000_000  # stamps of the published frames
STATIC_NS = 5_000_000_000


def pattern(index: int) -> np.ndarray:
    """The rgb8 pixels of frame `index` (distinct per frame and per pixel)."""
    y, x = np.mgrid[0:HEIGHT, 0:WIDTH]
    rgb = np.stack([(x + 3 * index) % 256, (y * 2 + index) % 256, (x + y + 50 * index) % 256], axis=-1)
    return rgb.astype(np.uint8)


def image_msg(index: int, stamp_ns: int):
    from sensor_msgs.msg import Image

    msg = Image()
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
    msg.header.frame_id = f"frame_{index}"
    msg.height, msg.width, msg.encoding, msg.step = HEIGHT, WIDTH, "rgb8", WIDTH * 3
    msg.data = pattern(index).tobytes()
    return msg


def camera_info_msg(stamp_ns: int):
    from sensor_msgs.msg import CameraInfo

    msg = CameraInfo()
    msg.header.stamp.sec, msg.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
    msg.header.frame_id = "camera_color_optical_frame"
    msg.height, msg.width = HEIGHT, WIDTH
    msg.k = [100.0, 0.0, 80.0, 0.0, 101.0, 60.0, 0.0, 0.0, 1.0]
    msg.distortion_model, msg.d = "plumb_bob", [0.0] * 5
    return msg


def tf_msg(index: int, stamp_ns: int, child: str = "camera_color_optical_frame"):
    from geometry_msgs.msg import TransformStamped
    from tf2_msgs.msg import TFMessage

    transform = TransformStamped()
    transform.header.stamp.sec, transform.header.stamp.nanosec = divmod(stamp_ns, 1_000_000_000)
    transform.header.frame_id, transform.child_frame_id = "world", child
    transform.transform.translation.x = 0.1 * index
    transform.transform.rotation.w = 1.0
    return TFMessage(transforms=[transform])


def event_msg():
    from instascene_ros.msg import InstanceEvent

    return InstanceEvent(kind=InstanceEvent.MERGED, instance_id=4, merged_ids=[5, 6], map_version=9)


def time_ns(stamp) -> int:
    return stamp.sec * 1_000_000_000 + stamp.nanosec


def stamp_ns(header) -> int:
    return time_ns(header.stamp)


def publish(tf_subscribers: int = 1) -> int:
    from instascene_ros.msg import InstanceEvent
    from sensor_msgs.msg import CameraInfo, Image
    from tf2_msgs.msg import TFMessage

    rclpy.init()
    node = Node("bag_test_publisher")
    static = node.create_publisher(TFMessage, "/tf_static", LATCHED)
    static.publish(tf_msg(7, STATIC_NS, child="camera_link"))  # before anyone listens: latched
    pubs = {"image": node.create_publisher(Image, "/camera/color/image_raw", RELIABLE),
            "info": node.create_publisher(CameraInfo, "/camera/color/camera_info", RELIABLE),
            "tf": node.create_publisher(TFMessage, "/tf", RELIABLE),
            "event": node.create_publisher(InstanceEvent, EVENT_TOPIC, RELIABLE)}
    deadline = time.monotonic() + 20.0
    wanted = {name: tf_subscribers if name == "tf" else 1 for name in pubs}
    while time.monotonic() < deadline and not all(p.get_subscription_count() >= wanted[name]
                                                  for name, p in pubs.items()):
        time.sleep(0.05)
    matched = {name: p.get_subscription_count() for name, p in pubs.items()}
    for index in range(N_FRAMES):
        stamp = BASE_NS + index * STEP_NS
        pubs["tf"].publish(tf_msg(index, stamp))
        if index == 0:
            pubs["info"].publish(camera_info_msg(stamp))
        pubs["image"].publish(image_msg(index, stamp))
        time.sleep(0.05)
    pubs["event"].publish(event_msg())
    acked = all(p.wait_for_all_acked(Duration(seconds=5)) for p in [*pubs.values(), static])
    print(json.dumps({"matched": matched, "acked": acked, "frames": N_FRAMES}), flush=True)
    node.destroy_node()
    rclpy.try_shutdown()
    return 0


def listen(n_images: int, last_ns: int) -> int:
    from rosgraph_msgs.msg import Clock
    from sensor_msgs.msg import CameraInfo, Image
    from tf2_msgs.msg import TFMessage

    rclpy.init()
    node = Node("bag_test_listener")
    arrivals, clocks = [], []

    def on_image(msg):
        index = int(msg.header.frame_id.split("_")[1])
        rgb = np.frombuffer(bytes(msg.data), np.uint8).reshape(msg.height, msg.width, 3)
        arrivals.append({"topic": "image", "t": time.monotonic(), "index": index, "stamp": stamp_ns(msg.header),
                         "exact": bool(msg.encoding == "rgb8" and (rgb == pattern(index)).all())})

    def on_info(msg):
        arrivals.append({"topic": "info", "t": time.monotonic(), "stamp": stamp_ns(msg.header), "k": list(msg.k)})

    def on_tf(topic):
        def callback(msg):
            for transform in msg.transforms:
                arrivals.append({"topic": topic, "t": time.monotonic(), "stamp": stamp_ns(transform.header),
                                 "child": transform.child_frame_id, "x": transform.transform.translation.x})
        return callback

    node.create_subscription(Image, "/camera/color/image_raw", on_image, RELIABLE)
    node.create_subscription(CameraInfo, "/camera/color/camera_info", on_info, RELIABLE)
    node.create_subscription(TFMessage, "/tf", on_tf("tf"), RELIABLE)
    node.create_subscription(TFMessage, "/tf_static", on_tf("tf_static"), LATCHED)
    node.create_subscription(Clock, "/clock", lambda msg: clocks.append(time_ns(msg.clock)),
                             QoSProfile(depth=200, reliability=ReliabilityPolicy.RELIABLE))
    print("ready", file=sys.stderr, flush=True)
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline:
        rclpy.spin_once(node, timeout_sec=0.05)
        if sum(a["topic"] == "image" for a in arrivals) >= n_images and clocks and max(clocks) >= last_ns:
            break
    end = time.monotonic() + 0.3  # anything straggling
    while time.monotonic() < end:
        rclpy.spin_once(node, timeout_sec=0.05)
    print(json.dumps({"arrivals": arrivals, "clocks": clocks}), flush=True)
    node.destroy_node()
    rclpy.try_shutdown()
    return 0


if __name__ == "__main__":
    if sys.argv[1] == "publish":
        sys.exit(publish(int(sys.argv[2]) if len(sys.argv) > 2 else 1))
    sys.exit(listen(int(sys.argv[2]), int(sys.argv[3])))
