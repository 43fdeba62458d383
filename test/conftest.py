"""Shared fixtures. ROS tests start real processes that talk over real DDS on localhost."""
import itertools
import os
import subprocess
import sys

import pytest

from instascene_ros.ros.environment import ros_environment

_domain_counter = itertools.count()


@pytest.fixture
def ros_env(tmp_path):
    """Environment for ROS child processes: localhost discovery, a domain id of their own."""
    domain_id = 100 + (os.getpid() + next(_domain_counter) * 7) % 100
    log_dir = tmp_path / "ros_log"
    log_dir.mkdir()
    return ros_environment(domain_id=domain_id, log_dir=log_dir)


@pytest.fixture
def ros_processes():
    """Start processes with `start(args, env)`; every one still running is SIGINT-ed, then killed."""
    started = []

    def start(args, env, **kwargs):
        process = subprocess.Popen([sys.executable, *args], env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, **kwargs)
        started.append(process)
        return process

    yield start
    for process in started:
        if process.poll() is None:
            process.send_signal(2)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
