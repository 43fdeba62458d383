"""Launch the instascene_ros nodes (real launch_ros API) from launch/nodes.yaml.

    ros2 launch instascene_ros instascene.launch.py namespace:=robot1 params_file:=/path/params.yaml

The node list, remappings and arguments come from the manifest that `instascene launch` reads as
well, so the two launchers cannot drift apart.
"""
import os

import yaml
from ament_index_python.packages import get_package_share_directory
from launch import LaunchDescription
from launch.actions import DeclareLaunchArgument
from launch.conditions import IfCondition
from launch.substitutions import LaunchConfiguration
from launch_ros.actions import Node

PACKAGE = "instascene_ros"


def generate_launch_description():
    share = get_package_share_directory(PACKAGE)
    with open(os.path.join(share, "launch", "nodes.yaml")) as stream:
        manifest = yaml.safe_load(stream)

    actions = []
    for name, argument in manifest["arguments"].items():
        default = str(argument["default"])
        if name == "params_file" and not os.path.isabs(default):
            default = os.path.join(share, default)
        actions.append(DeclareLaunchArgument(name, default_value=default, description=argument["description"]))

    for node in manifest["nodes"]:
        condition = IfCondition(LaunchConfiguration(node["condition"])) if node.get("condition") else None
        actions.append(Node(
            package=PACKAGE,
            executable=node["executable"],
            name=node["name"],
            namespace=LaunchConfiguration("namespace"),
            parameters=[LaunchConfiguration("params_file"), {"use_sim_time": LaunchConfiguration("use_sim_time")}],
            remappings=list(node.get("remappings", {}).items()),
            condition=condition,
            output="screen",
            emulate_tty=True,
        ))
    return LaunchDescription(actions)
