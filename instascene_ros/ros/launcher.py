"""`instascene launch`: start the manifest's nodes as processes, for machines without ros2launch.

`launch`/`launch_ros` are not installable from PyPI, so this reads launch/nodes.yaml (the same
manifest launch/instascene.launch.py reads) and runs each node as
`python -m MODULE --ros-args -r __node:=NAME -r __ns:=/NS --params-file FILE -r from:=to ...`.
Unlike `ros2 launch`, a node that dies makes the whole launch exit non-zero. SIGINT is forwarded
to every node (SIGTERM would orphan them), then stragglers are killed after a grace period.
"""
from __future__ import annotations

import dataclasses
import logging
import pathlib
import signal
import subprocess
import sys
import threading
import time
from typing import Optional

import yaml

from instascene_ros.ros.environment import PACKAGE_ROOT, ros_environment

log = logging.getLogger("instascene.launch")
MANIFEST = PACKAGE_ROOT / "launch" / "nodes.yaml"


@dataclasses.dataclass
class NodeSpec:
    name: str
    executable: str
    module: str
    remappings: dict
    condition: Optional[str] = None


def load_manifest(path: pathlib.Path = MANIFEST) -> tuple[dict, list[NodeSpec]]:
    manifest = yaml.safe_load(path.read_text())
    arguments = {name: str(spec["default"]) for name, spec in manifest["arguments"].items()}
    nodes = [NodeSpec(name=n["name"], executable=n["executable"], module=n["module"],
                      remappings=dict(n.get("remappings", {})), condition=n.get("condition"))
             for n in manifest["nodes"]]
    return arguments, nodes


def node_command(node: NodeSpec, arguments: dict) -> list[str]:
    """The command line that starts `node` with the launch arguments applied."""
    params_file = pathlib.Path(arguments["params_file"])
    if not params_file.is_absolute():
        params_file = PACKAGE_ROOT / params_file
    command = [sys.executable, "-m", node.module, "--ros-args", "-r", f"__node:={node.name}"]
    namespace = arguments.get("namespace", "").strip("/")
    if namespace:
        command += ["-r", f"__ns:=/{namespace}"]
    command += ["--params-file", str(params_file),
                "-p", f"use_sim_time:={'true' if arguments['use_sim_time'].lower() == 'true' else 'false'}"]
    for source, target in node.remappings.items():
        command += ["-r", f"{source}:={target}"]
    return command


def selected_nodes(nodes: list[NodeSpec], arguments: dict) -> list[NodeSpec]:
    return [n for n in nodes if not n.condition or arguments.get(n.condition, "true").lower() == "true"]


def _pump(stream, prefix: str) -> None:
    for line in iter(stream.readline, ""):
        sys.stdout.write(f"[{prefix}] {line}")
        sys.stdout.flush()


def launch(arguments: dict, nodes: list[NodeSpec], localhost_only: bool, grace_s: float = 10.0) -> int:
    """Run the nodes until SIGINT or until one exits; returns 0 only if every node ended cleanly."""
    env = ros_environment(localhost_only=localhost_only)
    processes: dict[str, subprocess.Popen] = {}
    stop = threading.Event()
    previous_handler = signal.signal(signal.SIGINT, lambda *_: stop.set())
    try:
        for node in selected_nodes(nodes, arguments):
            command = node_command(node, arguments)
            log.info("starting %s: %s", node.name, " ".join(command[1:]))
            process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       start_new_session=True)  # our SIGINT handler decides, not the terminal's
            threading.Thread(target=_pump, args=(process.stdout, node.name), daemon=True).start()
            processes[node.name] = process
        failed = None
        while not stop.is_set() and failed is None:
            for name, process in processes.items():
                if process.poll() is not None:
                    failed = name
                    break
            stop.wait(0.2)
        if failed is not None:
            log.error("%s exited with code %s; stopping the others", failed, processes[failed].returncode)
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        deadline = time.monotonic() + grace_s
        for name, process in processes.items():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("%s did not stop within %.0f s of SIGINT; killing it", name, grace_s)
                process.kill()
                process.wait()
        codes = {name: process.returncode for name, process in processes.items()}
        log.info("exit codes: %s", codes)
        clean = all(code in (0, -signal.SIGINT) for code in codes.values())
        return 0 if clean and failed is None else 1
    finally:
        signal.signal(signal.SIGINT, previous_handler)
