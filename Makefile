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

.PHONY: setup test demo clean-venv

setup: $(STAMP)

$(STAMP): $(SETUP_INPUTS)
	bash tools/setup.sh
	@touch $@

test: setup
	$(PY) -m pytest test

demo: setup
	$(VENV)/bin/instascene demo

clean-venv:
	rm -rf $(VENV) build
