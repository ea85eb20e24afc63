"""Benchmark harness for rebuildd (issue 5): `python -m bench --help`."""
