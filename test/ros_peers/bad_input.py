"""Test peer: publishes malformed input the node must drop and count without dying."""
import sys
import time

import rclpy

from instascene_ros.core.io import load_dataset
from instascene_ros.ros.dataset_publisher import DatasetPublisher


def main():
    dataset = load_dataset(sys.argv[1])
    frame = next(f for f in dataset.frames if f.meta.get("split") == "train")
    rclpy.init()
    node = DatasetPublisher([frame])
    # Wait for discovery (not a fixed sleep): on a loaded machine the node's subscriptions can
    # take seconds to match, and best-effort messages sent before that are simply lost.
    deadline = time.monotonic() + 30.0
    while time.monotonic() < deadline and (node.pub_image.get_subscription_count() == 0 or
                                           node.pub_info.get_subscription_count() == 0):
        time.sleep(0.1)
    time.sleep(0.5)
    start = node.get_clock().now()
    stamps = [(start + rclpy.duration.Duration(seconds=0.5 * i)).to_msg() for i in range(6)]

    def publish_with(stamp, mutate=None, camera_frame=None):
        original_publish = node.pub_image.publish

        def publish(msg):
            if mutate:
                mutate(msg)
            original_publish(msg)
        node.pub_image.publish = publish
        if camera_frame:
            node.camera_frame = camera_frame
        node.publish_frame(frame, stamp)
        node.pub_image.publish = original_publish
        node.camera_frame = "camera_color_optical_frame"
        time.sleep(0.3)

    publish_with(stamps[0], lambda m: setattr(m, "encoding", "yuv422"))          # unsupported encoding
    publish_with(stamps[1], lambda m: setattr(m, "data", bytes(m.data)[:-7]))     # step x height != len(data)
    # camera_info with zero focal length
    info_publish = node.pub_info.publish
    node.pub_info.publish = lambda msg: (setattr(msg, "k", [0.0] * 9), info_publish(msg))
    node.publish_frame(frame, stamps[2])
    node.pub_info.publish = info_publish
    time.sleep(0.3)
    # an image whose camera frame has no transform in TF
    tf_publish = node.pub_tf.publish
    node.pub_tf.publish = lambda msg: None
    publish_with(stamps[3], camera_frame="camera_without_tf")
    node.pub_tf.publish = tf_publish
    # a valid frame, then the same stamp again (duplicate) and an older one (out of order)
    node.publish_frame(frame, stamps[5])
    time.sleep(0.3)
    node.publish_frame(frame, stamps[5])
    node.publish_frame(frame, stamps[4])
    time.sleep(2.0)
    print("DONE", flush=True)
    node.destroy_node()
    rclpy.try_shutdown()


if __name__ == "__main__":
    main()
