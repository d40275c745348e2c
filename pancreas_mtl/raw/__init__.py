"""Raw data: reading images, dataset layouts and their discovery, checks, input limits, splits."""
