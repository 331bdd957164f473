"""Training algorithms: one module per mode, each exposing ``run(comm, net, src, opts, stop, backend, reporter, *,
plan, ...)`` that reads the run's ``asyncsgd.plan.RunPlan`` (resolved once by ``asyncsgd.api.prepare``).

``serial`` (one process), ``downpour`` (asynchronous SGD against the RMA parameter store), ``sync`` (all-reduce
data parallelism, for comparison) and ``sandblaster`` (sharded L-BFGS with dynamic mini-shards).
"""
import importlib

__all__ = ["get_mode"]


def get_mode(name: str):
    """Return the module implementing training mode ``name`` (one of asyncsgd.plan.MODES, each a module of this
    package by that name); unknown names are a ValueError."""
    from asyncsgd.plan import MODES
    if name not in MODES:
        raise ValueError(f"unknown mode {name!r}; choose one of {', '.join(MODES)}")
    return importlib.import_module(f"{__name__}.{name}")
