"""Slicing: (plan, original tensors) -> pruned tensors, driven by one axis table."""
