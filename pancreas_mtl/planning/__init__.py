"""Dataset fingerprint and nnU-Net-style experiment planning (spacing, normalisation, patch, topology)."""
