# The two commands of the README. Each runs scripts/setup.sh first, which returns at
# once when the virtual environment is already complete.
PYTHON ?= .venv/bin/python

.PHONY: setup demo quick test test-all

setup:
	./scripts/setup.sh

demo: setup
	$(PYTHON) -m mmalign run configs/demo.yaml

quick: setup
	$(PYTHON) -m mmalign run configs/quick.yaml

test: setup
	$(PYTHON) -m pytest -q

test-all: setup
	$(PYTHON) -m pytest -q -m "slow or not slow"
