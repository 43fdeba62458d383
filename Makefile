# The two commands a newcomer needs: `make demo` and `make test`. Both set up first when needed.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
SETUP_INPUTS := tools/setup.sh tools/repoint_ros_wheel_cmake.py requirements.txt requirements-nodeps.txt \
	constraints.txt setup.py CMakeLists.txt package.xml $(wildcard msg/*.msg srv/*.srv action/*.action)
STAMP := $(VENV)/.setup-done
# Every ROS process of the tests and the demo stays on this machine.
export ROS_AUTOMATIC_DISCOVERY_RANGE ?= LOCALHOST
export PYTHONUNBUFFERED := 1

.PHONY: setup setup-gpu test demo clean-venv

setup: $(STAMP)

$(STAMP): $(SETUP_INPUTS)
	VENV=$(abspath $(VENV)) bash tools/setup.sh
	@touch $@

# The GPU path in its own venv: CUDA torch + gsplat with its extension compiled now, for this GPU.
# Then `make test VENV=.venv-gpu` (the CUDA parity tests run) or `make demo VENV=.venv-gpu`.
setup-gpu:
	INSTASCENE_GPU=1 VENV=$(CURDIR)/.venv-gpu bash tools/setup.sh
	@touch .venv-gpu/.setup-done

test: setup
	$(PY) -m pytest test

demo: setup
	$(VENV)/bin/instascene demo $(if $(wildcard $(VENV)/.instascene_gpu),--device cuda)

clean-venv:
	rm -rf $(VENV) build
