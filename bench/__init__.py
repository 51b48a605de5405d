"""Benchmarks: MeshNet against baselines started by the same run (``make bench``)."""
