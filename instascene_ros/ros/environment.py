"""Environment for ROS processes started by this package (tests, demo, `instascene launch`).

Kilted ignores ROS_LOCALHOST_ONLY; ROS_AUTOMATIC_DISCOVERY_RANGE=LOCALHOST keeps discovery on
this machine. A per-run ROS_DOMAIN_ID keeps concurrent test runs apart, and the Fast DDS
profile enlarges the shared-memory segment so camera images are not fragmented.
"""
from __future__ import annotations

import os
import pathlib
from typing import Optional

PACKAGE_ROOT = pathlib.Path(__file__).resolve().parents[2]
FASTDDS_PROFILE = PACKAGE_ROOT / "config" / "fastdds_large_images.xml"


def ros_environment(domain_id: Optional[int] = None, log_dir: Optional[os.PathLike] = None,
                    base: Optional[dict] = None, localhost_only: bool = True) -> dict:
    """A copy of `base` (default: os.environ) with the ROS variables our processes need."""
    env = dict(os.environ if base is None else base)
    if domain_id is not None:
        if not 0 <= domain_id <= 232:
            raise ValueError(f"ROS_DOMAIN_ID {domain_id} outside 0..232")
        env["ROS_DOMAIN_ID"] = str(domain_id)
    if localhost_only:
        env["ROS_AUTOMATIC_DISCOVERY_RANGE"] = "LOCALHOST"
    env.setdefault("RMW_IMPLEMENTATION", "rmw_fastrtps_cpp")
    if FASTDDS_PROFILE.exists() and localhost_only:
        env.setdefault("FASTDDS_DEFAULT_PROFILES_FILE", str(FASTDDS_PROFILE))
    if log_dir is not None:
        env["ROS_LOG_DIR"] = str(log_dir)
    env["PYTHONUNBUFFERED"] = "1"
    return env


ROS_VARIABLES = ("ROS_DOMAIN_ID", "ROS_AUTOMATIC_DISCOVERY_RANGE", "ROS_LOG_DIR", "FASTDDS_DEFAULT_PROFILES_FILE",
                 "RMW_IMPLEMENTATION")


def adopt_ros_environment(env: dict) -> dict:
    """Put env's ROS variables into this process's environment, so that rclpy in this process
    talks to the nodes started with env. Returns the previous environment, for restoring."""
    previous = dict(os.environ)
    os.environ.update({key: env[key] for key in ROS_VARIABLES if key in env})
    return previous
