"""`instascene ...`: the command-line entry point.

Each subcommand lives in `instascene_ros/commands/<name>.py` with `add_parser(subparsers)` and
`run(args) -> int`. Modules are imported only to build the parser; heavy imports (torch,
pybullet, rclpy) belong inside `run`, so `instascene --help` stays instant.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from instascene_ros.stack_dump import dump_stacks_on_sigusr1

# (command, module) in the order `--help` lists them.
SUBCOMMANDS = [
    ("make-scene", "instascene_ros.commands.make_scene"),
    ("demo", "instascene_ros.commands.demo"),
    ("run", "instascene_ros.commands.run"),
    ("complete", "instascene_ros.commands.complete"),
    ("bench", "instascene_ros.commands.bench"),
    ("launch", "instascene_ros.commands.launch"),
    ("publish-dataset", "instascene_ros.commands.publish_dataset"),
    ("play / record", "instascene_ros.commands.bag"),
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="instascene",
        description="Online Gaussian-splatting instance mapping and object completion (ROS 2 package tools).",
        epilog="Run `instascene COMMAND --help` for a command's options.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for _, module_name in SUBCOMMANDS:
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            if error.name == module_name:  # command not part of this build yet
                continue
            raise
        module.add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if argv is None:  # a process of its own (not a caller's in-process use): see stack_dump
        dump_stacks_on_sigusr1()
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not getattr(args, "run", None):
        parser.print_help()
        return 2
    return int(args.run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
