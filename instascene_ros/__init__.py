"""instascene_ros: online Gaussian-splatting instance mapping and object completion for ROS 2.

`core` is the ROS-free science; `ros` is the thin rclpy layer. The generated ROS interfaces
(`instascene_ros.msg`, `.srv`, `.action`) are built by rosidl and installed beside this
package: on a robot by colcon into the same directory, here by `make setup` into the venv's
site-packages. `extend_path` lets the source tree and the generated interfaces form one
package whichever of them comes first on sys.path.
"""
from pkgutil import extend_path

__path__ = extend_path(__path__, __name__)
__version__ = "0.1.0"
