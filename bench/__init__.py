"""Benchmarks: ``make bench`` (``python -m bench``). Figures, not tests: nothing asserts a time."""
