"""Benchmarks: programs that print timings and ratios against a reference measured in the same run."""
