"""The parameter YAML, the node declarations and the launch manifest agree (no ROS graph needed)."""
import ast
import dataclasses
import importlib
import pathlib

import pytest
import yaml

from instascene_ros.ros.launcher import MANIFEST, load_manifest, node_command, selected_nodes
from instascene_ros.ros.parameters import DESCRIPTIONS, NodeParameters, validate
from instascene_ros.ros.segmenter_node import PARAMETERS as SEGMENTER_PARAMETERS

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((ROOT / "config" / "instascene.yaml").read_text())


def test_yaml_lists_every_mapper_parameter_with_its_default():
    yaml_params = CONFIG["/**/instascene_node"]["ros__parameters"]
    defaults = NodeParameters()
    names = {field.name for field in dataclasses.fields(NodeParameters)}
    assert set(yaml_params) == names
    assert set(DESCRIPTIONS) == names
    for name in names:
        value = getattr(defaults, name)
        assert yaml_params[name] == value or (isinstance(value, float) and float(yaml_params[name]) == value), name
    validate(NodeParameters(**yaml_params))


def test_yaml_lists_every_segmenter_parameter_with_its_default():
    yaml_params = CONFIG["/**/instascene_segmenter"]["ros__parameters"]
    assert set(yaml_params) == set(SEGMENTER_PARAMETERS)
    for name, (default, _) in SEGMENTER_PARAMETERS.items():
        assert yaml_params[name] == default, name


def test_manifest_nodes_exist_and_commands_apply_launch_arguments():
    arguments, nodes = load_manifest()
    assert {n.name for n in nodes} == {"instascene_node", "instascene_segmenter"}
    for node in nodes:
        module = importlib.import_module(node.module)
        assert callable(module.main)
        script = ROOT / "scripts" / node.executable
        assert script.exists() and node.module in script.read_text()
    arguments.update(namespace="robot1", use_sim_time="true", with_segmenter="false")
    chosen = selected_nodes(nodes, arguments)
    assert [n.name for n in chosen] == ["instascene_node"]
    command = node_command(chosen[0], arguments)
    assert command[command.index("--params-file") + 1] == str(ROOT / "config" / "instascene.yaml")
    assert "__ns:=/robot1" in command and "use_sim_time:=true" in command
    assert "mask:=instascene_segmenter/mask" in command
    # remapping matches whole names: the compressed input needs its own rule
    assert "image/compressed:=/camera/color/image_raw/compressed" in command


def test_launch_file_reads_the_same_manifest_with_launch_ros():
    source = (ROOT / "launch" / "instascene.launch.py").read_text()
    tree = ast.parse(source)
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) for alias in node.names}
    assert {"Node", "DeclareLaunchArgument", "LaunchConfiguration", "IfCondition"} <= imported
    assert MANIFEST.name in source
    manifest = yaml.safe_load(MANIFEST.read_text())
    assert set(manifest["arguments"]) == {"namespace", "params_file", "use_sim_time", "with_segmenter"}


def test_cmake_installs_the_executables_and_interfaces():
    cmake = (ROOT / "CMakeLists.txt").read_text()
    for node in load_manifest()[1]:
        assert f"scripts/{node.executable}" in cmake
    for folder in ("msg", "srv", "action"):
        for path in (ROOT / folder).iterdir():
            assert f'"{folder}/{path.name}"' in cmake, path


def test_rviz_config_shows_what_the_node_publishes():
    rviz = yaml.safe_load((ROOT / "config" / "instascene.rviz").read_text())
    topics = {display["Topic"]["Value"] for display in rviz["Visualization Manager"]["Displays"] if "Topic" in display}
    assert {"/instascene_node/instances/cloud", "/instascene_node/instances/markers",
            "/instascene_node/instance_overlay", "/instascene_node/scene/cloud"} <= topics
    source = (ROOT / "instascene_ros" / "ros" / "mapper_node.py").read_text()
    for topic in topics:
        if topic.startswith("/instascene_node/"):
            assert f'"~/{topic.split("/instascene_node/")[1]}"' in source, topic


def test_instance_field_parameter_selects_the_decomposition_and_rejects_unknown_names():
    from dataclasses import replace

    from instascene_ros.core.pipeline import PipelineConfig

    for name, objective, codebook in (("instascene", "contrastive", False), ("codebook", "contrastive", True),
                                      ("classifier", "classifier", False)):
        config = PipelineConfig.from_node_parameters(NodeParameters(instance_field=name))
        assert (config.features.objective, config.features.codebook.enabled) == (objective, codebook), name
        assert config.features.background_cluster  # our default applies to every method
    with pytest.raises(ValueError, match="instance_field must be"):
        validate(replace(NodeParameters(), instance_field="sam"))


def test_primitive_parameter_reaches_mapper_field_and_instances_and_rejects_unknown_names():
    from dataclasses import replace

    from instascene_ros.core.pipeline import PipelineConfig

    config = PipelineConfig.from_node_parameters(NodeParameters())
    assert (config.mapper.primitive, config.features.primitive, config.instances.primitive) == ("3dgs",) * 3
    config = PipelineConfig.from_node_parameters(NodeParameters(primitive="2dgs"))
    assert (config.mapper.primitive, config.features.primitive, config.instances.primitive) == ("2dgs",) * 3
    with pytest.raises(ValueError, match="primitive must be '3dgs' or '2dgs'"):
        validate(replace(NodeParameters(), primitive="3dgs+"))


def test_contact_border_parameter_reaches_the_tracker_and_rejects_negatives():
    from dataclasses import replace

    from instascene_ros.core.pipeline import PipelineConfig

    assert PipelineConfig.from_node_parameters(NodeParameters()).tracker.mask_border_px == 2.0
    config = PipelineConfig.from_node_parameters(NodeParameters(mask_contact_border_px=0.0))
    assert config.tracker.mask_border_px == 0.0 and config.tracker.dbscan_eps == 0.02  # the rest kept
    with pytest.raises(ValueError, match="mask_contact_border_px must be >= 0"):
        validate(replace(NodeParameters(), mask_contact_border_px=-1.0))


def test_table_band_parameter_reaches_the_pipeline_and_zero_turns_it_off():
    from dataclasses import replace

    from instascene_ros.core.pipeline import PipelineConfig

    assert PipelineConfig.from_node_parameters(NodeParameters()).table.mask_band == 0.003
    assert PipelineConfig.from_node_parameters(NodeParameters(table_band_m=0.0)).table.mask_band is None
    assert PipelineConfig.from_node_parameters(NodeParameters(table_band_m=0.01)).table.mask_band == 0.01
    with pytest.raises(ValueError, match="table_band_m must be >= 0"):
        validate(replace(NodeParameters(), table_band_m=-0.001))


def test_stall_report_rejects_negatives():
    from dataclasses import replace

    validate(replace(NodeParameters(), stall_report_ms=0.0))  # off
    with pytest.raises(ValueError, match="stall_report_ms must be >= 0"):
        validate(replace(NodeParameters(), stall_report_ms=-1.0))


def test_mapper_nice_is_checked_and_lowers_only_the_calling_thread():
    import os
    import sys
    import threading
    from dataclasses import replace

    from instascene_ros.ros.mapper_node import lower_this_threads_priority

    validate(replace(NodeParameters(), mapper_nice=0))
    for wrong in (-1, 20):
        with pytest.raises(ValueError, match="mapper_nice must be 0-19"):
            validate(replace(NodeParameters(), mapper_nice=wrong))
    if sys.platform != "linux":
        assert "Linux" in lower_this_threads_priority(10)
        return
    seen = {}

    def mapper_like():
        seen["refused"] = lower_this_threads_priority(10)
        seen["own"] = os.getpriority(os.PRIO_PROCESS, 0)
        child = threading.Thread(target=lambda: seen.update(child=os.getpriority(os.PRIO_PROCESS, 0)))
        child.start()
        child.join()

    before = os.getpriority(os.PRIO_PROCESS, 0)
    thread = threading.Thread(target=mapper_like)
    thread.start()
    thread.join()
    assert seen == {"refused": "", "own": max(10, before), "child": seen["own"]}, seen
    assert os.getpriority(os.PRIO_PROCESS, 0) == before  # the executor's threads keep theirs
    assert lower_this_threads_priority(0) == ""


def test_pose_parameters_reach_the_mapper():
    from instascene_ros.core.pipeline import PipelineConfig

    refinement = PipelineConfig.from_node_parameters(NodeParameters()).mapper.pose_refinement
    assert refinement.enabled and refinement.photometric
    refinement = PipelineConfig.from_node_parameters(NodeParameters(photometric_poses=False)).mapper.pose_refinement
    assert refinement.enabled and not refinement.photometric  # ICP stays
    refinement = PipelineConfig.from_node_parameters(NodeParameters(refine_poses=False)).mapper.pose_refinement
    assert not refinement.enabled and not refinement.photometric  # trusted poses: neither


def test_keyframe_budget_parameter_reaches_the_mapper_and_rejects_budgets_that_cannot_replace():
    from dataclasses import replace

    from instascene_ros.core.pipeline import PipelineConfig

    assert PipelineConfig.from_node_parameters(NodeParameters()).mapper.keyframes.max_keyframes == 80
    assert PipelineConfig.from_node_parameters(NodeParameters(max_keyframes=0)).mapper.keyframes.max_keyframes == 0
    for bad in (-1, 1, 2):
        with pytest.raises(ValueError, match="max_keyframes must be 0 .unbounded. or >= 3"):
            validate(replace(NodeParameters(), max_keyframes=bad))
    validate(replace(NodeParameters(), max_keyframes=3))


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a CUDA device is present")
def test_cuda_device_without_a_gpu_is_refused_before_any_frame_with_the_reason():
    from dataclasses import replace

    from instascene_ros.core.mapping import Mapper, MapperConfig

    with pytest.raises(ValueError, match=r"device 'cuda': torch .* sees no CUDA device; use device 'cpu'"):
        validate(replace(NodeParameters(), device="cuda"))
    validate(NodeParameters())  # the default (cpu) stays valid
    config = MapperConfig.cpu()
    config.device = "cuda"
    with pytest.raises(RuntimeError, match="make setup-gpu"):
        Mapper(config)


def test_a_float_parameter_takes_an_integer_and_refuses_a_string(ros_env):
    # `stall_report_ms:=100` reaches the node as an INTEGER; rclpy alone would refuse it for a
    # DOUBLE parameter, and the node would not start.
    import json
    import subprocess
    import sys

    def declare(*overrides):
        done = subprocess.run([sys.executable, str(ROOT / "test" / "ros_peers" / "declare_parameters.py"), *overrides],
                              env=ros_env, capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    values = declare("stall_report_ms=100", "table_band_m=0")
    assert values == {"stall_report_ms": 100.0, "table_band_m": 0.0, "queue_size": 4}
    assert isinstance(values["stall_report_ms"], float)
    assert declare('stall_report_ms="slow"') == {"error": "stall_report_ms must be a number, not 'slow'"}


def test_waiting_for_a_node_that_cannot_start_fails_at_once_with_its_log(tmp_path):
    # The demo and the live bench wait for "ready:" in the node's log; a node that exits first
    # (a bad parameter) must end the wait with its own words, not after the 180 s timeout.
    import subprocess
    import sys
    import time

    from instascene_ros.commands.demo import _wait_for_log

    log = tmp_path / "instascene_node.log"
    process = subprocess.Popen([sys.executable, "-c", "print('cannot start: stall_report_ms must be >= 0'); exit(2)"],
                               stdout=open(log, "w"), stderr=subprocess.STDOUT)
    tick = time.monotonic()
    with pytest.raises(RuntimeError, match="exited with code 2 before 'ready:'.*stall_report_ms must be >= 0"):
        _wait_for_log(log, "ready:", 60, process)
    assert time.monotonic() - tick < 10
