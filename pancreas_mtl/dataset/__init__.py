"""The planned dataset: preprocessing, cache, patch sampling, augmentation and the Lightning data module."""
