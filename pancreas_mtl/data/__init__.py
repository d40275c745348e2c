"""Data layer: discovery of raw datasets, checks, preprocessing cache, patch sampling and augmentation."""
