"""The one `main()` shape of our nodes: build, spin a multi-threaded executor, stop cleanly.

A node whose parameters cannot work fails at construction with one fatal log line and exit code
2 (no traceback); Ctrl-C (SIGINT) and an external shutdown end the spin normally, and the node's
own `shutdown()` (if any) runs before it is destroyed, so `ros2 launch` / `instascene launch`
see exit code 0.
"""
from __future__ import annotations

from typing import Callable

import rclpy
from rclpy.executors import Executor, ExternalShutdownException, MultiThreadedExecutor
from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy

from instascene_ros.stack_dump import dump_stacks_on_sigusr1


def spin_until_shutdown(executor: Executor) -> None:
    """`executor.spin()` that ends normally on Ctrl-C or an external shutdown.

    rclpy's SIGINT handler shuts the context down from another thread; when that lands between
    spin's check of the context and its next wait set, rclpy raises RCLError ("the given context
    is not valid") rather than ExternalShutdownException (a clean-clone CI run hit it once in
    `test_ros_smoke.py`). With the context down that is the same shutdown, not a failure; with
    the context still up it is a real error and propagates."""
    try:
        executor.spin()
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except _rclpy.RCLError:
        if executor.context.ok():
            raise


def run_node(factory: Callable[[], object], name: str, startup_errors: tuple, num_threads: int, args=None) -> int:
    dump_stacks_on_sigusr1()  # `kill -USR1 <pid>`: every thread's stack, the node goes on
    rclpy.init(args=args)
    try:
        node = factory()
    except startup_errors as error:
        rclpy.logging.get_logger(name).fatal(f"cannot start: {error}")
        rclpy.try_shutdown()
        return 2
    executor = MultiThreadedExecutor(num_threads=num_threads)
    executor.add_node(node)
    try:
        spin_until_shutdown(executor)
    finally:
        if hasattr(node, "shutdown"):
            node.shutdown()
        executor.shutdown()
        node.destroy_node()
        rclpy.try_shutdown()
    return 0
