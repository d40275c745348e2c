"""Studies over trained runs: cross-validation of a sweep's folds, a held-out test set, and comparing
runs. They predict and evaluate, so they sit above inference and evaluation."""
