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
# # 03 · Errors of a prediction
#
# From an evaluation folder (what `pancreas-mtl evaluate` writes: `per_case.csv`, `summary.json`; the
# subtype probabilities are the `p0, p1, ...` columns): per-case Dice, NSD and HD95 by subtype, the
# worst cases side by side with their image and reference, the subtype confusion matrix, ROC curves,
# the calibration of the probabilities, and the lesions missed or over-segmented.
# The masks and images are read from the folders summary.json names (its `inputs`).

# %% tags=["parameters"]
evaluation_dir = "outputs/eval"   # an evaluation folder: the out of pancreas-mtl evaluate
images = None                     # folder of the images {case}_0000.nii.gz; None: as evaluate found them
worst_metric = "lesion_dice"      # the worst cases by it (highest for *_hd95, else lowest)
worst_count = 4
volume_ratio = 1.5                # a lesion over- or under-segmented by more than this factor is listed
calibration_bins = 10

# %%
# %matplotlib inline
from IPython.display import display

from pancreas_mtl.evaluation.analysis import (
    classification_figures,
    evaluation_case_files,
    load_evaluation,
    metrics_by_subtype,
)
from pancreas_mtl.evaluation.case_views import lesion_errors, worst_cases_figure
from pancreas_mtl.evaluation.evaluate import format_summary
from pancreas_mtl.evaluation.plots import metric_by_subtype_figure
from pancreas_mtl.evaluation.selection import worst_cases

evaluation = load_evaluation(evaluation_dir)
print(format_summary(evaluation.summary))

# %% [markdown]
# ## Dice, NSD and HD95 by subtype (crosses: misses, HD95 at the image diagonal)

# %%
metrics_by_subtype(evaluation.rows)

# %%
for kind in ("dice", "nsd", "hd95"):
    display(metric_by_subtype_figure(evaluation.rows, kind))

# %% [markdown]
# ## The worst cases: image, reference, prediction (reference outlined) on the slice with the most lesion

# %%
case_files = evaluation_case_files(evaluation, images)
worst_cases_figure(worst_cases(evaluation.rows, worst_metric, worst_count), case_files, worst_metric)

# %% [markdown]
# ## Subtypes: confusion matrix, ROC curves, calibration

# %%
for figure in classification_figures(evaluation, calibration_bins):
    display(figure)

# %% [markdown]
# ## Lesions missed or over-segmented

# %%
lesion_errors(evaluation.rows, case_files, volume_ratio)
