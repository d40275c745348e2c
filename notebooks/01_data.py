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
# # 01 · The dataset as it is read
#
# A dataset root in either layout (distributed `train|validation/subtype{k}/`, or nnU-Net raw with
# `dataset.json` and `subtype_mapping.json`; docs/data.md), read through the same checks as training:
# cases per split and subtype, spacing and shape, intensities inside pancreas and lesion per subtype,
# lesion volume per subtype, mid-lesion slices, and the plan the planner derives, with why.
# Arrays are (z, y, x); intensities are the stored values (HU).

# %% tags=["parameters"]
data_root = "outputs/data/synthetic_default"  # a dataset root in either layout
num_subtypes = 3
splits = None                     # e.g. ["train", "validation"]; None: every labelled case
intensity_range = [-200.0, 300.0]  # HU range of the histograms
bins = 100
cases_per_subtype = 4             # slices in the montage
planning_preset = "M"             # conf/planning/{M,L,small}.yaml
plan_overrides = {}               # as planning.overrides in train.py, e.g. {"spacing_scale": 2.0}

# %%
# %matplotlib inline
from pancreas_mtl.raw.summary import by_subtype, mid_lesion_views, split_subtype_counts, summarise_dataset
from pancreas_mtl.evaluation.dataset_plots import (
    intensity_histograms_figure,
    montage_figure,
    per_subtype_figure,
    spacing_shape_figure,
)
from pancreas_mtl.planning.explain import explain_plan
from pancreas_mtl.planning.fingerprint import compute_fingerprint
from pancreas_mtl.planning.planner import load_preset

summary = summarise_dataset(data_root, num_subtypes=num_subtypes, splits=splits,
                            intensity_range=intensity_range, bins=bins)
split_subtype_counts(summary.index)

# %% [markdown]
# ## Voxel spacing and image shape

# %%
spacing_shape_figure(summary.cases)

# %%
by_subtype(summary.cases, ["spacing_z", "spacing_y", "spacing_x", "shape_z", "shape_y", "shape_x"])

# %% [markdown]
# ## Intensities inside the pancreas and the lesion, per subtype

# %%
intensity_histograms_figure(summary)

# %%
by_subtype(summary.cases, ["pancreas_mean", "pancreas_sd", "lesion_mean", "lesion_sd"])

# %% [markdown]
# ## Lesion and pancreas volume per subtype

# %%
per_subtype_figure(summary.cases)

# %%
by_subtype(summary.cases, ["lesion_ml", "pancreas_ml"])

# %% [markdown]
# ## Mid-lesion slices per subtype (pancreas outlined green, lesion red)

# %%
montage_figure(mid_lesion_views(summary.index, cases_per_subtype, splits=splits))

# %% [markdown]
# ## The plan, and why
#
# nnU-Net's rules (docs/planning.md) on this dataset's fingerprint: target spacing, patch size within
# the preset's memory budget, and the network topology that patch allows.

# %%
fingerprint = compute_fingerprint(summary.index, progress=False)
plan, why = explain_plan(fingerprint, load_preset(planning_preset), plan_overrides)
print(why)

# %% [markdown]
# ## Every case as read

# %%
summary.cases
