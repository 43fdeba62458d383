"""`instascene launch`: start the mapper (and segmenter) nodes without ros2launch."""
from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "launch", help="start the ROS nodes (same manifest as launch/instascene.launch.py)",
        description="Start instascene_node (and instascene_segmenter) as ROS 2 processes from launch/nodes.yaml. "
                    "Equivalent to `ros2 launch instascene_ros instascene.launch.py` on machines without ros2launch. "
                    "Ctrl-C stops every node; a node that crashes makes the launch exit non-zero.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--params", dest="params_file", default=None, help="parameter YAML (default: config/instascene.yaml)")
    parser.add_argument("--namespace", default=None, help="namespace for every node, e.g. robot1")
    parser.add_argument("--use-sim-time", action="store_true", help="follow /clock (rosbag replay)")
    parser.add_argument("--no-segmenter", action="store_true", help="do not start the 2D segmenter node")
    parser.add_argument("--localhost", action="store_true",
                        help="keep DDS discovery on this machine (ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST + loopback profile)")
    parser.add_argument("--dry-run", action="store_true", help="print the node command lines and exit")
    parser.set_defaults(run=run)


def run(args) -> int:
    from instascene_ros.ros.launcher import launch, load_manifest, node_command, selected_nodes

    arguments, nodes = load_manifest()
    if args.params_file:
        arguments["params_file"] = args.params_file
    if args.namespace is not None:
        arguments["namespace"] = args.namespace
    if args.use_sim_time:
        arguments["use_sim_time"] = "true"
    if args.no_segmenter:
        arguments["with_segmenter"] = "false"
    if args.dry_run:
        for node in selected_nodes(nodes, arguments):
            print(" ".join(node_command(node, arguments)))
        return 0
    return launch(arguments, nodes, localhost_only=args.localhost)
