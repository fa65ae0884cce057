"""Benchmarks: scripts that print figures and ratios against a baseline measured in the same run.

Run from the repository root as `python -m benchmarks.<name>`; see benchmarks/README.md.
"""
