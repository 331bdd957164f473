"""The named networks and ``build_model``: speech_cnn, mnist_cnn, logreg.

Convolution blocks are conv -> max-pool -> ReLU.  ReLU and max-pooling commute (max(relu(a), relu(b)) =
relu(max(a, b))), so this is the usual conv -> ReLU -> pool network, with the ReLU done on 4x fewer values.
"""
from __future__ import annotations

import numpy

from .layers import Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU
from .network import Network
from .ops import NumpyOps

__all__ = ["MODEL_NAMES", "build_model", "speech_cnn_layers", "mnist_cnn_layers", "logreg_layers", "default_ops"]

MODEL_NAMES = ("speech_cnn", "mnist_cnn", "logreg")

DEFAULT_INPUT_SHAPES = {"speech_cnn": (1, 40, 64), "mnist_cnn": (1, 28, 28), "logreg": (1, 40, 64)}


def _image_shape(name, input_shape, min_hw):
    if len(input_shape) != 3 or any(int(d) < 1 for d in input_shape):
        raise ValueError(f"{name} needs input_shape (C, H, W) of positive sizes, got {tuple(input_shape)}")
    c, h, w = (int(d) for d in input_shape)
    if h < min_hw or w < min_hw:
        raise ValueError(f"{name} needs inputs of at least {min_hw}x{min_hw} (two 2x2 poolings), got {h}x{w}; "
                         f"use longer feature windows or the logreg model")
    return c, h, w


def speech_cnn_layers(input_shape=(1, 40, 64), n_classes: int = 10):
    """Return the layers of the spoken-digit CNN for log-mel inputs (C, H=mel bands, W=frames).

    conv 5x5 (16, pad 2) -> pool 2 -> relu -> conv 3x3 (32, pad 1) -> pool 2 -> relu -> dense 128 -> relu ->
    dropout 0.25 -> dense n_classes.  Convolution and pooling run over both time and frequency, as in Chan & Lane's
    acoustic CNNs.  Activations for (1, 40, 64): (16, 40, 64) -> (16, 20, 32) -> (32, 20, 32) -> (32, 10, 16) ->
    5120 -> 128 -> n_classes; 661,834 parameters for 10 classes.  Any H, W >= 16 works; the first dense layer has
    32 * (H//4) * (W//4) * 128 weights.
    """
    _image_shape("speech_cnn", input_shape, 16)
    return [Conv2D(16, 5, pad=2), MaxPool2D(2), ReLU(),
            Conv2D(32, 3, pad=1), MaxPool2D(2), ReLU(),
            Flatten(), Dense(128), ReLU(), Dropout(0.25), Dense(n_classes)]


def mnist_cnn_layers(input_shape=(1, 28, 28), n_classes: int = 10):
    """Return the layers of the image CNN (LeNet-like) for (C, 28, 28) digits.

    conv 5x5 (16, pad 2) -> pool 2 -> relu -> conv 5x5 (32, pad 2) -> pool 2 -> relu -> dense 128 -> relu ->
    dropout 0.25 -> dense n_classes.  Activations for (1, 28, 28): (16, 28, 28) -> (16, 14, 14) -> (32, 14, 14) ->
    (32, 7, 7) -> 1568 -> 128 -> n_classes; 215,370 parameters for 10 classes.
    """
    _image_shape("mnist_cnn", input_shape, 8)
    return [Conv2D(16, 5, pad=2), MaxPool2D(2), ReLU(),
            Conv2D(32, 5, pad=2), MaxPool2D(2), ReLU(),
            Flatten(), Dense(128), ReLU(), Dropout(0.25), Dense(n_classes)]


def logreg_layers(input_shape=(1, 40, 64), n_classes: int = 10):
    """Return multinomial logistic regression: flatten (C*H*W) -> dense n_classes.  Convex; used for L-BFGS checks."""
    if len(input_shape) < 1 or any(int(d) < 1 for d in input_shape):
        raise ValueError(f"logreg needs an input_shape of positive sizes, got {tuple(input_shape)}")
    return [Flatten(), Dense(n_classes)]


_BUILDERS = {"speech_cnn": speech_cnn_layers, "mnist_cnn": mnist_cnn_layers, "logreg": logreg_layers}


def default_ops(xp):
    """Return the ops for array module ``xp``: NumpyOps for numpy, CupyOps (imported only then) for cupy."""
    if xp is numpy:
        return NumpyOps()
    if getattr(xp, "__name__", "") == "cupy":
        from asyncsgd.gpu.cupy_ops import CupyOps
        return CupyOps()
    raise ValueError(f"no ops for array module {getattr(xp, '__name__', xp)!r}; use numpy or cupy, or pass ops=")


def build_model(name: str, input_shape=None, n_classes: int = 10, *, seed: int = 0, xp=numpy,
                dtype=numpy.float32, ops=None) -> Network:
    """Return network ``name`` (one of MODEL_NAMES) for per-sample ``input_shape`` (C, H, W) and ``n_classes``.

    Parameters are He-normal from ``seed`` (identical on every backend); ``xp`` is numpy or cupy; ``dtype`` float32
    (training) or float64 (gradient checks); ``ops`` overrides the backend primitives (default: from ``xp``).
    ``input_shape`` None means the model's default ((1, 40, 64) speech, (1, 28, 28) MNIST).
    """
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    if input_shape is None:
        input_shape = DEFAULT_INPUT_SHAPES[name]
    input_shape = tuple(int(d) for d in input_shape)
    if int(n_classes) < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    if ops is None:
        ops = default_ops(xp)
    elif ops.xp is not xp:
        raise ValueError(f"ops {type(ops).__name__} work on {ops.xp.__name__} arrays but xp is {xp.__name__}")
    layers = _BUILDERS[name](input_shape, int(n_classes))
    return Network(name, layers, input_shape, int(n_classes), ops=ops, dtype=dtype, seed=seed)
