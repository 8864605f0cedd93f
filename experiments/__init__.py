"""Experiment grids, tables, figures and benchmarks: `python -m experiments.<name>`."""
