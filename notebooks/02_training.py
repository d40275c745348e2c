# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     notebook_metadata_filter: kernelspec,jupytext
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · Training runs
#
# Learning curves from the CSV logs of one run or several (a run folder `outputs/runs/<task>/<date>_<time>/`
# or a multirun folder `outputs/runs/<task>/multirun/<date>_<time>/` whose jobs are `<n>/`), validation
# metrics over epochs, the runs at their best epoch, the mean and spread over seeds or folds, and the
# ranking of scored sweeps (`pancreas-mtl compare` of sweeps scored by `pancreas-mtl crossval` or
# `pancreas-mtl holdout`).

# %% tags=["parameters"]
runs = ["outputs/runs/train/multirun/DATE_TIME"]  # run or multirun folders (csv/version_N/metrics.csv, or <n>/ jobs)
metric = "val/combined"            # the best epoch of a run is chosen by it (lower is better for *_hd95)
repeat_keys = ["seed", "data.fold"]  # runs differing only in these are repeats of one experiment
compare_runs = []                  # sweeps scored by pancreas-mtl crossval (or all by holdout), ranked by compare
compare_out = "outputs/notebooks/compare"  # where compare writes compare.json, compare.csv and compare.md
compare_metric = "combined"

# %%
# %matplotlib inline
from IPython.display import display

from pancreas_mtl.studies.compare import ranking_table
from pancreas_mtl.evaluation.runs import group_runs, metric_over_epochs_figure, run_curves_figures, runs_table

# %% [markdown]
# ## Learning curves, one figure per run

# %%
for figure in run_curves_figures(runs):
    display(figure)

# %% [markdown]
# ## Validation metrics over epochs, all runs

# %%
metric_over_epochs_figure(runs)

# %% [markdown]
# ## Each run at its best epoch

# %%
table = runs_table(runs, metric)
table

# %% [markdown]
# ## Mean and spread over seeds or folds

# %%
group_runs(table, repeat_keys)

# %% [markdown]
# ## Scored sweeps, ranked (`pancreas-mtl compare`)

# %%
ranking_table(compare_runs, compare_out, compare_metric, progress=False)
