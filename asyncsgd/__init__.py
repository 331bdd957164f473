"""asyncsgd: asynchronous distributed training of convolutional networks over MPI.

Downpour SGD and Sandblaster L-BFGS (Dean et al. 2012) with the sparse, momentum and staleness-decayed updates of
Chan & Lane (2014), on numpy CPU ranks and CuPy GPU ranks.  The parameter store is a set of MPI one-sided windows.

    import asyncsgd
    result = asyncsgd.train_downpour("speech_cnn", "fsdd", asyncsgd.DownpourOptions(n_push=4),
                                     asyncsgd.Stop(epochs=30))     # under mpiexec -n 6; a TrainResult on rank 0

See the README, "Python API".
"""
__version__ = "0.1.0"

import sys as _sys

if "numpy" not in _sys.modules:  # BLAS reads its thread count once, when numpy loads
    from asyncsgd.runtime.env import limit_blas_threads as _limit_blas_threads
    _limit_blas_threads()

# public name -> the module that defines it
_HOMES = {}
# training (asyncsgd.api)
_HOMES.update(dict.fromkeys(("train_mode", "train_serial", "train_sync", "train_downpour", "train_sandblaster",
                             "prepare", "PreparedRun", "TrainResult", "build_network", "default_comm", "MODES"),
                            "api"))
# options and policies (asyncsgd.options)
_HOMES.update(dict.fromkeys(("Stop", "SGDOptions", "DownpourOptions", "SandblasterOptions", "CheckpointOptions",
                             "OptionError", "NoDecay", "InverseDecay", "ExponentialDecay"), "options"))
# models: the network, its layers, the model registry and model files (asyncsgd.model)
_HOMES.update(dict.fromkeys(("Network", "Layer", "Conv2D", "MaxPool2D", "AvgPool2D", "ReLU", "Tanh", "Sigmoid",
                             "Flatten", "Dense", "Dropout", "register_layer", "layer_from_spec", "register_model",
                             "resolve_model", "build_model", "check_model", "speech_cnn", "mnist_cnn", "logreg",
                             "load_model", "save_model", "NumpyOps"), "model"))
# the per-rank compute object (asyncsgd.backends)
_HOMES.update(dict.fromkeys(("select_ops",), "backends"))

__all__ = ["__version__", *_HOMES]


def __getattr__(name):
    # Imported on first use (PEP 562): `python -m asyncsgd.train` sets the BLAS thread count before numpy loads.
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'asyncsgd' has no attribute {name!r}")
    import importlib
    value = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))
