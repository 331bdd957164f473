"""Model factories: the built-in networks, the registry, and ``resolve_model`` for user networks.

A model factory is a callable ``factory(input_shape, n_classes, *, ops, seed=0) -> Network``: ``input_shape`` is one
example's (C, H, W), ``ops`` the rank's compute object (``asyncsgd.backends.select_ops``), ``seed`` the parameters'
seed.  A factory that cannot take ``input_shape`` raises ValueError saying why.  The built-ins ``speech_cnn``,
``mnist_cnn`` and ``logreg`` are registered by name with ``register_model``; any other factory is named by its import
path ``PACKAGE.MODULE:FUNCTION`` (importable from the working directory or an installed package), e.g.
``--model mynets:small_cnn``.

Convolution blocks of the built-ins are conv -> max-pool -> ReLU.  ReLU and max-pooling commute
(max(relu(a), relu(b)) = relu(max(a, b))), so this is the usual conv -> ReLU -> pool network, with the ReLU done on
4x fewer values.
"""
from __future__ import annotations

import importlib
import inspect
import os
import sys

import numpy

from asyncsgd.model.layers import Conv2D, Dense, Dropout, Flatten, MaxPool2D, ReLU
from asyncsgd.model.network import Network
from asyncsgd.backends.numpy_ops import NumpyOps

__all__ = ["MODELS", "MODEL_NAMES", "register_model", "resolve_model", "build_model", "check_model", "speech_cnn", "mnist_cnn",
           "logreg", "default_ops", "DEFAULT_INPUT_SHAPES"]

MODELS: dict = {}               # name -> factory, the registered networks

DEFAULT_INPUT_SHAPES = {"speech_cnn": (1, 40, 64), "mnist_cnn": (1, 28, 28), "logreg": (1, 40, 64)}


def register_model(name: str):
    """Decorator: register ``factory`` under ``name`` so ``resolve_model(name)`` (and ``--model name``) finds it."""
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"a model name is a non-empty string without ':', got {name!r}")

    def register(factory):
        if not callable(factory):
            raise TypeError(f"register_model({name!r}) needs a callable factory, got {factory!r}")
        MODELS[name] = factory
        return factory
    return register


def _image_shape(name, input_shape, min_h, min_w, why):
    if len(input_shape) != 3 or any(int(d) < 1 for d in input_shape):
        raise ValueError(f"{name} needs input_shape (C, H, W) of positive sizes, got {tuple(input_shape)}")
    c, h, w = (int(d) for d in input_shape)
    if h < min_h or w < min_w:
        raise ValueError(f"{name} needs inputs of at least {min_h}x{min_w} ({why}), got {h}x{w}; "
                         f"use more mel bands or longer feature windows, or the logreg model")
    return c, h, w


def _ops(ops):
    return NumpyOps() if ops is None else ops


@register_model("speech_cnn")
def speech_cnn(input_shape=(1, 40, 64), n_classes: int = 10, *, ops=None, seed: int = 0,
               dtype=numpy.float32) -> Network:
    """The spoken-digit CNN for log-mel inputs (C, H=mel bands, W=frames); any H, W >= 4 (two 2x2 poolings).

    conv 5x5 (16, pad 2) -> pool 2 -> relu -> conv 3x3 (32, pad 1) -> pool 2 -> relu -> dense 128 -> relu ->
    dropout 0.25 -> dense n_classes.  Convolution and pooling run over both time and frequency, as in Chan & Lane's
    acoustic CNNs.  Activations for (1, 40, 64): (16, 40, 64) -> (16, 20, 32) -> (32, 20, 32) -> (32, 10, 16) ->
    5120 -> 128 -> n_classes; 661,834 parameters for 10 classes.  The first dense layer has
    32 * (H//4) * (W//4) * 128 weights.
    """
    _image_shape("speech_cnn", input_shape, 4, 4, "two 2x2 poolings over mel bands and frames")
    layers = [Conv2D(16, 5, pad=2), MaxPool2D(2), ReLU(),
              Conv2D(32, 3, pad=1), MaxPool2D(2), ReLU(),
              Flatten(), Dense(128), ReLU(), Dropout(0.25), Dense(n_classes)]
    return Network("speech_cnn", layers, input_shape, n_classes, ops=_ops(ops), dtype=dtype, seed=seed)


@register_model("mnist_cnn")
def mnist_cnn(input_shape=(1, 28, 28), n_classes: int = 10, *, ops=None, seed: int = 0,
              dtype=numpy.float32) -> Network:
    """The image CNN (LeNet-like) for (C, 28, 28) digits; any H, W >= 4.

    conv 5x5 (16, pad 2) -> pool 2 -> relu -> conv 5x5 (32, pad 2) -> pool 2 -> relu -> dense 128 -> relu ->
    dropout 0.25 -> dense n_classes.  Activations for (1, 28, 28): (16, 28, 28) -> (16, 14, 14) -> (32, 14, 14) ->
    (32, 7, 7) -> 1568 -> 128 -> n_classes; 215,370 parameters for 10 classes.
    """
    _image_shape("mnist_cnn", input_shape, 4, 4, "two 2x2 poolings")
    layers = [Conv2D(16, 5, pad=2), MaxPool2D(2), ReLU(),
              Conv2D(32, 5, pad=2), MaxPool2D(2), ReLU(),
              Flatten(), Dense(128), ReLU(), Dropout(0.25), Dense(n_classes)]
    return Network("mnist_cnn", layers, input_shape, n_classes, ops=_ops(ops), dtype=dtype, seed=seed)


@register_model("logreg")
def logreg(input_shape=(1, 40, 64), n_classes: int = 10, *, ops=None, seed: int = 0,
           dtype=numpy.float32) -> Network:
    """Multinomial logistic regression: flatten (C*H*W) -> dense n_classes.  Convex; used for L-BFGS checks."""
    if len(input_shape) < 1 or any(int(d) < 1 for d in input_shape):
        raise ValueError(f"logreg needs an input_shape of positive sizes, got {tuple(input_shape)}")
    return Network("logreg", [Flatten(), Dense(n_classes)], input_shape, n_classes, ops=_ops(ops), dtype=dtype,
                   seed=seed)


MODEL_NAMES = tuple(MODELS)     # the built-ins, in registration order


def resolve_model(spec):
    """Return ``(name, factory)`` for ``spec``: a registered name, ``"PACKAGE.MODULE:FUNCTION"``, or a callable.

    A callable is named ``module:qualname``.  An import path is imported from the working directory or the installed
    packages.  Raises ValueError saying what to do for an unknown name, an unimportable module or a missing or
    non-callable attribute.
    """
    if callable(spec):
        return f"{getattr(spec, '__module__', '?')}:{getattr(spec, '__qualname__', type(spec).__name__)}", spec
    if not isinstance(spec, str) or not spec:
        raise ValueError(f"a model is a registered name, 'PACKAGE.MODULE:FUNCTION' or a callable, got {spec!r}")
    if spec in MODELS:
        return spec, MODELS[spec]
    if ":" not in spec:
        raise ValueError(f"unknown model {spec!r}; choose one of {', '.join(MODELS)}, or name your own factory "
                         f"as PACKAGE.MODULE:FUNCTION (importable from the working directory)")
    module_name, _, qualname = spec.partition(":")
    if not module_name or not qualname:
        raise ValueError(f"model {spec!r}: write PACKAGE.MODULE:FUNCTION, e.g. mynets:small_cnn")
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.append(cwd)              # the working directory, as `python -m` would put it first
    try:
        obj = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise ValueError(f"model {spec!r}: cannot import {module_name!r} ({exc}); run from the folder that holds "
                         f"it, add that folder to PYTHONPATH, or install its package") from None
    except Exception as exc:              # the user's module failed while importing
        raise ValueError(f"model {spec!r}: importing {module_name!r} failed: {type(exc).__name__}: {exc}") from None
    for part in qualname.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"model {spec!r}: {module_name!r} has no attribute {qualname!r}; check the name after "
                             f"the ':'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise ValueError(f"model {spec!r}: {qualname!r} is not callable; it must be a factory "
                         f"(input_shape, n_classes, *, ops, seed) -> Network")
    return spec, obj


def default_ops(xp):
    """Return the ops for array module ``xp``: NumpyOps for numpy, CupyOps (imported only then) for cupy."""
    if xp is numpy:
        return NumpyOps()
    if getattr(xp, "__name__", "") == "cupy":
        from asyncsgd.backends.cupy_ops import CupyOps
        return CupyOps()
    raise ValueError(f"no ops for array module {getattr(xp, '__name__', xp)!r}; use numpy or cupy, or pass ops=")


def _takes_dtype(factory) -> bool:
    try:
        return "dtype" in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def build_model(name, input_shape=None, n_classes: int = 10, *, seed: int = 0, xp=numpy,
                dtype=numpy.float32, ops=None) -> Network:
    """Return the network of ``name`` (anything ``resolve_model`` takes) for ``input_shape`` (C, H, W), ``n_classes``.

    Parameters come from ``seed``; ``dtype`` float32 (training) or float64 (gradient checks): a factory without a
    ``dtype`` argument is built in float32 and cast.  ``ops`` is the compute object (default: from ``xp``).
    ``input_shape`` None means a built-in's default ((1, 40, 64) speech, (1, 28, 28) MNIST).  The network's
    ``factory`` attribute is set to the resolved name (what a saved model records).
    """
    resolved, factory = resolve_model(name)
    if input_shape is None:
        if resolved not in DEFAULT_INPUT_SHAPES:
            raise ValueError(f"model {resolved!r} has no default input shape; give input_shape (C, H, W)")
        input_shape = DEFAULT_INPUT_SHAPES[resolved]
    input_shape = tuple(int(d) for d in input_shape)
    if int(n_classes) < 2:
        raise ValueError(f"n_classes must be >= 2, got {n_classes}")
    if ops is None:
        ops = default_ops(xp)
    elif ops.xp is not xp and xp is not numpy:
        raise ValueError(f"ops {type(ops).__name__} work on {ops.xp.__name__} arrays but xp is {xp.__name__}")
    dtype = numpy.dtype(dtype)
    extra = {"dtype": dtype} if _takes_dtype(factory) else {}
    net = factory(input_shape, int(n_classes), ops=ops, seed=int(seed), **extra)
    if not isinstance(net, Network):
        raise TypeError(f"model factory {resolved!r} returned {type(net).__name__}, not an asyncsgd.model.Network")
    if net.input_shape != input_shape or net.n_classes != int(n_classes):
        raise ValueError(f"model factory {resolved!r} built a network for input {net.input_shape} and "
                         f"{net.n_classes} classes, but was asked for {input_shape} and {n_classes}")
    if net.dtype != dtype:
        net = net.astype(dtype)
    net.factory = resolved
    return net


def check_model(model, input_shape, n_classes: int) -> int:
    """Build ``model`` (anything ``resolve_model`` takes) once on the host for data of ``input_shape`` and
    ``n_classes``; return its parameter count.  Raises ValueError saying why the model does not fit the data (an
    unknown or unimportable model, poolings that do not fit the inputs, ...), before any training starts.
    """
    return build_model(model, tuple(input_shape), int(n_classes), ops=NumpyOps()).n_params
