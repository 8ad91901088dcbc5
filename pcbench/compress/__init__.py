"""Compression: one map of tensor axes, importance scores, plans, hard pruning and PC."""
