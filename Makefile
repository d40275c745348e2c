# The two quick-start commands, `make demo` and `make test`, each set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-dev demo test test-all bench clean-outputs

setup:
	scripts/setup.sh

setup-dev:
	scripts/setup.sh dev

# Main job on the built-in synthetic data: train the CPU preset, predict, evaluate.
demo: setup
	scripts/demo.sh

# The test suite as CI runs it (slow end-to-end tests included).
test: setup-dev
	$(PY) -m pytest -x -n 2

# Benchmarks; results are appended to docs/benchmarks.md by hand.
bench: setup-dev
	$(PY) bench/preprocessing_throughput.py
	$(PY) bench/sampling_throughput.py
	$(PY) bench/inference_speed.py

clean-outputs:
	rm -rf outputs multirun
