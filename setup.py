"""Python packaging for the venv workflow (`make setup`) and plain `pip install .`.

On a robot with a full ROS 2 install, colcon builds the package through CMakeLists.txt
(ament_cmake + rosidl + ament_cmake_python) instead; both install the same Python package.
"""
from setuptools import find_packages, setup

setup(
    name="instascene_ros",
    version="0.1.0",
    description="Online Gaussian-splatting instance mapping and object completion for ROS 2",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["instascene_ros", "instascene_ros.*"]),
    package_data={"instascene_ros": ["py.typed"]},
    entry_points={
        "console_scripts": [
            "instascene = instascene_ros.cli:main",
        ],
    },
)
