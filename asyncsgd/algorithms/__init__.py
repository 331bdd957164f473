"""Training algorithms: one module per mode, each exposing ``run(comm, net, src, opts, stop, backend, reporter, ...)``.

``serial`` (one process), ``downpour`` (asynchronous SGD against the RMA parameter store), ``sync`` (all-reduce
data parallelism, for comparison) and ``sandblaster`` (sharded L-BFGS with dynamic mini-shards).
"""
import importlib

__all__ = ["get_mode"]


def get_mode(name: str):
    """Return the module implementing training mode ``name``; unknown names are a ValueError."""
    modules = {"serial": "serial", "downpour": "downpour", "sync": "sync", "sandblaster": "sandblaster"}
    if name not in modules:
        raise ValueError(f"unknown mode {name!r}; choose one of {', '.join(modules)}")
    return importlib.import_module(f"{__name__}.{modules[name]}")
