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
PAPERMILL = $(VENV)/bin/papermill --no-progress-bar
comma := ,
space := $(subst ,, )
yaml_list = [$(subst $(space),$(comma),$(patsubst %,'%',$(strip $(1))))]

notebooks: setup-notebooks
	@if [ -z "$(strip $(DATA)$(RUNS)$(EVAL))" ]; then \
	    echo "make notebooks: give DATA=<dataset root>, RUNS=<run or multirun folders> and/or EVAL=<evaluation folder>"; \
	    exit 2; fi
	mkdir -p $(NB_OUT)
	@if [ -n "$(DATA)" ]; then set -x; $(PAPERMILL) notebooks/01_data.ipynb $(NB_OUT)/01_data.ipynb \
	    -r data_root "$(DATA)"; fi
	@if [ -n "$(strip $(RUNS))" ]; then set -x; $(PAPERMILL) notebooks/02_training.ipynb $(NB_OUT)/02_training.ipynb \
	    -y "runs: $(call yaml_list,$(RUNS))" -y "compare_runs: $(call yaml_list,$(COMPARE))" \
	    -r compare_out "$(NB_OUT)/compare"; fi
	@if [ -n "$(EVAL)" ]; then set -x; $(PAPERMILL) notebooks/03_errors.ipynb $(NB_OUT)/03_errors.ipynb \
	    -r evaluation_dir "$(EVAL)"; fi

# Remove outputs and execution counts from the committed notebooks (tests/test_notebooks.py refuses them).
notebooks-strip: setup-dev
	$(VENV)/bin/nbstripout notebooks/*.ipynb

clean-outputs:
	rm -rf outputs multirun
