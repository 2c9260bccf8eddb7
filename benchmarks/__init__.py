"""The benchmark harness of rawproxy: `python -m benchmarks` (see benchmarks/README.md)."""
