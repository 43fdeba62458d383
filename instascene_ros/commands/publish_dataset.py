"""`instascene publish-dataset DIR --rate HZ`: stream a dataset folder over ROS topics + TF."""
from __future__ import annotations

import argparse


def parse_millimetres_degrees(text: str) -> tuple[float, float]:
    """'MM,DEG' -> (millimetres, degrees), both non-negative (pose noise, pose step sizes)."""
    try:
        millimetres, degrees = (float(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError("expected MM,DEG, e.g. 5,0.5") from None
    if not (millimetres >= 0 and degrees >= 0):
        raise argparse.ArgumentTypeError(f"MM,DEG must be non-negative numbers, got {text!r}")
    return millimetres, degrees


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "publish-dataset", help="stream a dataset folder as camera topics with TF",
        description="Publish each training frame of a dataset folder on camera/color/image_raw, "
                    "camera/color/camera_info, camera/aligned_depth_to_color/image_raw (32FC1), segmenter/mask "
                    "(32SC1, the dataset's input masks) and /tf (world -> camera_color_optical_frame), "
                    "one stamp per frame, at a fixed rate. Ground truth is never published.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("dataset", help="dataset folder with transforms.json")
    parser.add_argument("--rate", type=float, default=2.0, help="frames per second")
    parser.add_argument("--pose-noise", type=parse_millimetres_degrees, default=(0.0, 0.0), metavar="MM,DEG",
                        help="random pose error per frame: translation in mm, rotation in degrees")
    parser.add_argument("--loops", type=int, default=1, help="times to play the sequence")
    parser.add_argument("--no-depth", action="store_true", help="do not publish depth")
    parser.add_argument("--no-masks", action="store_true", help="do not publish the dataset's 2D masks")
    parser.add_argument("--clock", action="store_true", help="also publish /clock (for use_sim_time nodes)")
    parser.add_argument("--split", default="train", choices=["train", "test", "all"], help="which frames")
    parser.set_defaults(run=run)


def run(args) -> int:
    import rclpy

    from instascene_ros.core.io import DatasetError
    from instascene_ros.ros.dataset_publisher import publish_dataset

    if args.rate <= 0:
        print("instascene publish-dataset: --rate must be positive")
        return 2
    rclpy.init()
    try:
        publish_dataset(args.dataset, args.rate, args.pose_noise, args.loops, not args.no_depth, not args.no_masks,
                        args.split, publish_clock=args.clock)
    except DatasetError as error:
        print(f"instascene publish-dataset: {error}")
        return 2
    except KeyboardInterrupt:
        pass
    finally:
        rclpy.try_shutdown()
    return 0
