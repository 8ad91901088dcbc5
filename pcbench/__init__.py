"""pcbench: a reproduction and benchmark harness for Projected Compression."""

__version__ = "0.1.0"
