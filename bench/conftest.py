"""Benchmarks run with pytest-benchmark: `python -m pytest bench/ --benchmark-columns=median,ops`."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
