"""Evaluation: case-level metrics, the evaluate command (per-case table, summary with bootstrap intervals,
plots), and the pictures and tables of error analysis; each module is imported by its own name."""
