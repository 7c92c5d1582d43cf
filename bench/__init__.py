"""Benchmarks: `make bench` (or `python -m bench`). Medians over repeats, compared as ratios in one run."""
