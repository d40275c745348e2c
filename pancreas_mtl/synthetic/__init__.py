"""The built-in synthetic CT set: CT-like cases with pancreas, lesion and subtype in the real layout."""
