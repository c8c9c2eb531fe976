"""Benchmarks behind ``moco bench ...``: each returns a JSON-able dict comparing against a baseline
measured in the same run. Results are recorded in docs/BENCHMARKS.md."""
