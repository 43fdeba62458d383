"""Re-point the include paths baked into the PyPI ROS wheels' CMake exports.

The Kilted wheels were built in a manylinux container, and their exported
`*__rosidl_generator_pyExport.cmake` files still name that container's Python and NumPy
include directories (/opt/python/cp311-cp311/...). CMake refuses imported targets with
non-existent include paths, so building any interface package against the wheels fails
until those paths point at this venv's interpreter. Idempotent.
"""
import pathlib
import sys
import sysconfig

import numpy


def main(prefix: str) -> int:
    python_include = sysconfig.get_paths()["include"]
    numpy_include = numpy.get_include()
    changed = 0
    for export in pathlib.Path(prefix, "share").glob("*/cmake/*__rosidl_generator_py*Export*.cmake"):
        text = export.read_text()
        fixed = text
        for stale_numpy in ("/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/_core/include",
                            "/opt/python/cp311-cp311/lib/python3.11/site-packages/numpy/core/include"):
            fixed = fixed.replace(stale_numpy, numpy_include)
        fixed = fixed.replace("/opt/python/cp311-cp311/include/python3.11", python_include)
        if fixed != text:
            export.write_text(fixed)
            changed += 1
    print(f"repointed {changed} CMake export file(s) to {python_include} and {numpy_include}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else sys.prefix))
