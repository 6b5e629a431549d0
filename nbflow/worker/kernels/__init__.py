"""Warm kernels: the pool, the cell runner, the papermill engine."""
