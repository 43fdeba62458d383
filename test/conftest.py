"""Shared fixtures. ROS tests start real processes that talk over real DDS on localhost."""
import itertools
import os
import signal
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


@pytest.fixture(scope="module")
def torch_one_thread():
    """torch on one thread: on 2 shared cores its own threads only fight the numba kernels."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def wait_for_output(process, text: str, timeout: float, stream: str = "stderr") -> str:
    """Read a child's stream until a line contains `text`; returns what was read (fails on timeout/exit)."""
    import selectors
    import time

    pipe = getattr(process, stream)
    selector = selectors.DefaultSelector()
    selector.register(pipe, selectors.EVENT_READ)
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        if selector.select(timeout=0.5):
            line = pipe.readline()
            if not line and process.poll() is not None:
                break
            seen.append(line)
            if text in line:
                return "".join(seen)
        elif process.poll() is not None:
            break
    raise AssertionError(f"no '{text}' within {timeout} s (exit code {process.poll()}):\n" + "".join(seen)[-3000:])


def communicate_or_dump(process, timeout: float) -> tuple[str, str]:
    """`process.communicate(timeout)`; on a timeout, the child (an `instascene` command) is asked
    for every thread's stack (SIGUSR1, see cli.main), killed, and the test fails with its stderr."""
    try:
        return process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGUSR1)
        try:
            process.wait(timeout=2)
        except subprocess.TimeoutExpired:
            process.kill()
        stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(process.args[-6:])} still running after {timeout} s; its stacks:\n{stderr[-6000:]}")


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


def small_completion_config():
    """The cpu completion preset with smaller images and grids: the same code paths in seconds."""
    import dataclasses

    from instascene_ros.core.complete import CompletionConfig

    config = CompletionConfig.cpu()
    config.views = dataclasses.replace(config.views, image_size=96)
    config.optimise = dataclasses.replace(config.optimise, steps=30)
    config.mesh = dataclasses.replace(config.mesh, grid_resolution=56, image_size=96, views_per_ring=10)
    return config


def kinds_tabletop(kinds: dict, views: int, resolution: int, seed: int = 0):
    """Table-top fixture of generator kinds: {object id: (kind, (x, y))}, yaw and size drawn by `seed`."""
    import numpy as np

    from instascene_ros.core.complete.tabletop import build_tabletop, place_on_table
    from instascene_ros.core.synth.config import ObjectSizeConfig
    from instascene_ros.core.synth.objects import build_object

    rng = np.random.default_rng(seed)
    objects = {}
    for object_id, (kind, xy) in kinds.items():
        spec = build_object(kind, rng, ObjectSizeConfig())
        objects[object_id] = (place_on_table(spec.mesh, xy, yaw_deg=rng.uniform(0, 90)), np.array(spec.rgba[:3]))
    return build_tabletop(objects, views=views, resolution=resolution)
