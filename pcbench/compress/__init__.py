"""Compression: one map of tensor axes, importance scores, plans, hard pruning and PC.

May import: `models`, `spec`, `util`. Imported by `methods`, `train`, `run`, `bench`.
"""
