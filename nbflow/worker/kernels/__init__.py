"""Warm kernels: the pool (pool.py), the cell runner (cellrun.py), the papermill engine (papermill.py).

papermill's engine registry loads entry points while ``papermill.engines`` is being imported, and
our entry point is ``nbflow.worker.kernels.papermill``. Importing papermill here, before any module
of this package, means the registry exists before our engine module starts: whichever is imported
first, ``papermill.engines`` or ours, neither sees the other half-initialised.
"""
import papermill.engines as _registry  # noqa: F401 - import order, see above (binds no `papermill`)
