"""Declare the mapper's parameters on a bare rclpy node with the overrides given as NAME=JSON
arguments; print the values read (JSON) or the ValueError's message."""
import json
import sys

import rclpy
from rclpy.parameter import Parameter

from instascene_ros.ros.parameters import declare_and_read

rclpy.init()
overrides = [Parameter(name, value=json.loads(value)) for name, value in (a.split("=", 1) for a in sys.argv[1:])]
node = rclpy.create_node("declare_parameters", parameter_overrides=overrides)
try:
    parameters = declare_and_read(node)
    print(json.dumps({"stall_report_ms": parameters.stall_report_ms, "table_band_m": parameters.table_band_m,
                      "queue_size": parameters.queue_size}))
except ValueError as error:
    print(json.dumps({"error": str(error)}))
finally:
    node.destroy_node()
    rclpy.shutdown()
