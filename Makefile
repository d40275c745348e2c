# The two quick-start commands, `make demo` and `make test`, each set up .venv first.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: setup setup-dev setup-notebooks demo test test-all bench notebooks notebooks-strip clean-outputs

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

setup-notebooks:
	scripts/setup.sh notebooks

# The notebooks (docs/notebooks.md) executed headless against your own data, runs and evaluation, written
# with their figures to $(NB_OUT)/ (never into notebooks/); give any of the three:
#   make notebooks DATA=/data/quiz RUNS="outputs/runs/train/multirun/<date>_<time>" EVAL=outputs/eval
# RUNS: run or multirun folders; COMPARE: sweeps scored by pancreas-mtl crossval or holdout, to rank (compare).
NB_OUT ?= outputs/notebooks
DATA ?=
RUNS ?=
COMPARE ?=
EVAL ?=

# scripts/run_notebooks.py: papermill through the output-folder guard (NB_OUT inside notebooks/ is refused)
notebooks: setup-notebooks
	$(PY) scripts/run_notebooks.py --out "$(NB_OUT)" $(if $(strip $(DATA)),--data "$(DATA)") \
	    $(if $(strip $(RUNS)),--runs $(RUNS)) $(if $(strip $(COMPARE)),--compare $(COMPARE)) \
	    $(if $(strip $(EVAL)),--eval "$(EVAL)")

# Remove outputs and execution counts from the committed notebooks (tests/test_notebooks.py refuses them).
notebooks-strip: setup-dev
	$(VENV)/bin/nbstripout notebooks/*.ipynb

clean-outputs:
	rm -rf outputs multirun
