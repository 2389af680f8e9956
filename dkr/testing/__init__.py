"""Helpers for tests, the demo and the benchmarks: a real registry, image builders, an oracle."""
