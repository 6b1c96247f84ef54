"""Benchmarks of the ALL-USE Account Engine (`python -m perf.bench`, `make bench`)."""
