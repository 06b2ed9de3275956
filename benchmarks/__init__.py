"""Benchmarks that print their figures (`python -m benchmarks.NAME` from the repository root); never tests."""
