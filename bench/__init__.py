"""Benchmarks: ``make bench`` (``python -m bench``). Figures, not tests: nothing here asserts a time."""
