"""Benchmarks (``lmxd bench …``): each prints its figures beside their goals and writes JSON."""
