"""The network on one flat parameter vector: layers, model factories, and the rank's compute object.

    from asyncsgd.model import Network, Conv2D, MaxPool2D, ReLU, Flatten, Dense

    def small_cnn(input_shape, n_classes, *, ops, seed=0):
        layers = [Conv2D(8, (5, 3), pad=(2, 1)), MaxPool2D((2, 1)), ReLU(), Flatten(), Dense(n_classes)]
        return Network("small_cnn", layers, input_shape, n_classes, ops=ops, seed=seed)

Train it with ``--model mymodule:small_cnn``; ``load_model(path)`` rebuilds a saved one without ``mymodule``.
"""
from asyncsgd.model.builders import (DEFAULT_INPUT_SHAPES, MODEL_NAMES, MODELS, build_model, check_model,
                    default_ops, logreg, mnist_cnn, register_model, resolve_model, speech_cnn)
from asyncsgd.model.layers import (LAYER_TYPES, AvgPool2D, Conv2D, Dense, Dropout, Flatten, Layer, MaxPool2D, ReLU,
                    Sigmoid, Tanh, layer_from_spec, register_layer)
from asyncsgd.model import files
from asyncsgd.model.network import Network
from asyncsgd.backends.numpy_ops import NumpyOps


def load_model(path, *, ops=None):
    """Return the Network saved in model file ``path``, rebuilt from its recorded layers (no user code needed).

    See ``asyncsgd.model.files.load_model``.
    """
    return files.load_model(path, ops=ops)


def save_model(path, net, meta=None):
    """Write ``net`` (architecture and parameters) to model file ``path``; see ``asyncsgd.model.files.save_network``."""
    files.save_network(path, net, meta)


__all__ = ["Network", "NumpyOps", "Layer", "Conv2D", "MaxPool2D", "AvgPool2D", "ReLU", "Tanh", "Sigmoid", "Flatten",
           "Dense", "Dropout", "LAYER_TYPES", "register_layer", "layer_from_spec",
           "MODELS", "MODEL_NAMES", "DEFAULT_INPUT_SHAPES", "register_model", "resolve_model", "build_model", "check_model",
           "speech_cnn", "mnist_cnn", "logreg", "default_ops", "load_model", "save_model"]
