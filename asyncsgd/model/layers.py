"""Network layers: Conv2D, MaxPool2D, AvgPool2D, ReLU, Tanh, Sigmoid, Flatten, Dense, Dropout.

Every layer works on one mini-batch at a time and keeps what its backward pass needs from the last forward pass.
Image activations are channel-major ``(C, N, H, W)`` (see ``ops``); flat ones are ``(N, D)``.  Shapes given to
``output_shape`` are per sample, as the user sees them: ``(C, H, W)`` or ``(D,)``.  Kernel, window, stride and
padding sizes are an int (square) or an ``(h, w)`` pair, e.g. ``MaxPool2D((2, 1))`` pools over frequency only on
(C, mel bands, frames) inputs.

Parameters are not owned by the layers: ``Network`` hands each layer views into its flat parameter and gradient
vectors (``bind``), so the weights a layer reads are always the network's current vector, and ``backward`` writes
its gradients into the network's gradient vector.  Layers do array work only through ``self.ops`` and
``self.ops.xp``, so the GPU subclass of the ops runs them unchanged.

A layer's ``spec()`` is a JSON-able dict ``{"type": class name, **constructor arguments}``; ``layer_from_spec``
rebuilds it, which is how a saved model is rebuilt without the code that first built it.  A layer class of your
own joins by subclassing ``Layer``, returning its constructor arguments from ``config()`` and calling
``register_layer`` (a saved model using it then needs that registration to load).
"""
from __future__ import annotations

import math

from asyncsgd.backends.workspace import conv_output_size, pair

__all__ = ["Layer", "Conv2D", "MaxPool2D", "AvgPool2D", "ReLU", "Tanh", "Sigmoid", "Flatten", "Dense", "Dropout",
           "LAYER_TYPES", "register_layer", "layer_from_spec"]

LAYER_TYPES: dict = {}


def register_layer(cls):
    """Make ``cls`` (a Layer subclass) rebuildable by ``layer_from_spec`` under its class name; returns ``cls``."""
    if not (isinstance(cls, type) and issubclass(cls, Layer)):
        raise TypeError(f"register_layer takes a Layer subclass, got {cls!r}")
    LAYER_TYPES[cls.__name__] = cls
    return cls


def layer_from_spec(spec: dict) -> "Layer":
    """Return a new layer from ``spec`` (as ``Layer.spec()`` returns); ValueError for an unknown or bad spec."""
    if not isinstance(spec, dict) or "type" not in spec:
        raise ValueError(f"a layer spec is a dict with a 'type' key, got {spec!r}")
    kind = spec["type"]
    cls = LAYER_TYPES.get(kind)
    if cls is None:
        raise ValueError(f"unknown layer type {kind!r} in a model spec; known: {', '.join(sorted(LAYER_TYPES))} "
                         f"(a layer class of your own must be registered with asyncsgd.model.register_layer)")
    args = {k: tuple(v) if isinstance(v, list) else v for k, v in spec.items() if k != "type"}
    try:
        return cls(**args)
    except TypeError as exc:
        raise ValueError(f"layer spec {spec!r} does not fit {kind}: {exc}") from None


def _positive_pair(value, name, layer, minimum=1):
    try:
        h, w = pair(value, name)
    except TypeError as exc:
        raise TypeError(f"{layer}: {exc}") from None
    if h < minimum or w < minimum:
        raise ValueError(f"{layer} needs {name} >= {minimum}, got {value!r}")
    return h, w


class Layer:
    """Base class: a layer without parameters whose forward is the identity."""

    kind = "layer"

    def __init__(self):
        self.name = self.kind
        self.ops = None
        self.params = {}
        self.grads = {}
        self._ws = {}

    def config(self) -> dict:
        """Return the constructor arguments that rebuild this layer (JSON-able: ints, floats, lists)."""
        return {}

    def spec(self) -> dict:
        """Return ``{"type": class name, **config()}``: what ``layer_from_spec`` rebuilds this layer from."""
        return {"type": type(self).__name__, **self.config()}

    def param_specs(self, in_shape):
        """Return ``[(suffix, shape, fan_in), ...]``: the parameters this layer needs for per-sample ``in_shape``.

        ``fan_in`` is 0 for a bias (initialised to zero) and the number of inputs per output for a weight.
        """
        return []

    def output_shape(self, in_shape):
        """Return the per-sample output shape for per-sample ``in_shape``; raise ValueError if it does not fit."""
        return tuple(in_shape)

    def bind(self, ops, params, grads):
        """Attach the backend ``ops`` and the ``{suffix: view}`` dicts of parameter and gradient views."""
        self.ops = ops
        self.params = params
        self.grads = grads
        self._ws = {}

    def forward(self, x, train: bool, rng):
        """Return the layer's output for batch ``x``; ``train`` enables dropout, ``rng`` draws its masks."""
        return x

    def backward(self, dy, need_dx: bool = True):
        """Write parameter gradients (overwriting) and return dL/dx, or None when ``need_dx`` is False."""
        return dy if need_dx else None

    def describe(self):
        return ", ".join(f"{k}={v}" for k, v in self.config().items())

    def __repr__(self):
        return f"{type(self).__name__}({self.describe()})"


def _require_image(layer, in_shape):
    if len(in_shape) != 3:
        raise ValueError(f"{layer.kind} needs a (C, H, W) input, got shape {tuple(in_shape)}; put it before Flatten")


def _hw(p):
    return str(p[0]) if p[0] == p[1] else f"({p[0]}, {p[1]})"


@register_layer
class Conv2D(Layer):
    """2-D convolution: (C, N, H, W) -> (F, N, Ho, Wo); weights ``w`` (F, C, kh, kw) and bias ``b`` (F,).

    ``kernel``, ``stride`` and ``pad`` (zero padding on both sides) are an int or an ``(h, w)`` pair.
    """

    kind = "conv"

    def __init__(self, filters: int, kernel, stride=1, pad=0):
        super().__init__()
        if not isinstance(filters, int) or filters < 1:
            raise ValueError(f"Conv2D needs filters >= 1, got {filters!r}")
        self.filters = filters
        self.kh, self.kw = _positive_pair(kernel, "kernel", "Conv2D")
        self.stride = _positive_pair(stride, "stride", "Conv2D")
        self.pad = _positive_pair(pad, "pad", "Conv2D", minimum=0)
        self.fused_pool = None
        self.fused_relu = None

    def config(self):
        return {"filters": self.filters, "kernel": [self.kh, self.kw], "stride": list(self.stride),
                "pad": list(self.pad)}

    def fuse_pool(self, pool, relu=None):
        """Compute ``pool`` (a following 2x2/2 MaxPool2D) inside this layer with ``ops.conv2d_maxpool_*``, and
        ``relu`` (a ReLU right after the pool, or None) too where the ops can (``ops.fuses_conv_pool_relu``).

        Returns True when the pool is fused; the fused layers then pass values and gradients through unchanged.
        """
        if (self.stride != (1, 1) or not isinstance(pool, MaxPool2D) or pool.size != (2, 2)
                or pool.stride != (2, 2) or not self.ops.fuses_conv_pool):
            return False
        self.fused_pool, pool.fused = pool, True
        if isinstance(relu, ReLU) and getattr(self.ops, "fuses_conv_pool_relu", False):
            self.fused_relu, relu.fused = relu, True
        return True

    def param_specs(self, in_shape):
        _require_image(self, in_shape)
        c = in_shape[0]
        return [("w", (self.filters, c, self.kh, self.kw), c * self.kh * self.kw), ("b", (self.filters,), 0)]

    def output_shape(self, in_shape):
        _require_image(self, in_shape)
        _, h, w = in_shape
        ho = conv_output_size(h, self.kh, self.stride[0], self.pad[0])
        wo = conv_output_size(w, self.kw, self.stride[1], self.pad[1])
        if ho < 1 or wo < 1:
            raise ValueError(f"{self.name}: a {h}x{w} input is smaller than its {self.kh}x{self.kw} kernel "
                             f"(pad {_hw(self.pad)}); use a larger input or fewer pooling layers")
        return (self.filters, ho, wo)

    def forward(self, x, train, rng):
        w, b = self.params["w"], self.params["b"]
        if self.fused_pool is not None:
            if self.fused_relu is not None:
                y, self._cache = self.ops.conv2d_maxpool_forward(x, w, b, self.pad, ws=self._ws, relu=True)
            else:
                y, self._cache = self.ops.conv2d_maxpool_forward(x, w, b, self.pad, ws=self._ws)
        else:
            y, self._cache = self.ops.conv2d_forward(x, w, b, self.stride, self.pad, ws=self._ws)
        return y

    def backward(self, dy, need_dx=True):
        backward = self.ops.conv2d_maxpool_backward if self.fused_pool is not None else self.ops.conv2d_backward
        return backward(dy, self._cache, self.params["w"], self.grads["w"], self.grads["b"], need_dx=need_dx,
                        ws=self._ws)

    def describe(self):
        return f"{self.filters}, {_hw((self.kh, self.kw))}, stride={_hw(self.stride)}, pad={_hw(self.pad)}"


class _Pool2D(Layer):
    """Pooling over ``size`` windows (int or (kh, kw)) moved by ``stride`` (default: ``size``), no padding."""

    _max_offsets = None

    def __init__(self, size=2, stride=None):
        super().__init__()
        cls = type(self).__name__
        self.size = _positive_pair(size, "size", cls)
        self.stride = self.size if stride is None else _positive_pair(stride, "stride", cls)
        if self._max_offsets is not None and self.size[0] * self.size[1] > self._max_offsets:
            raise ValueError(f"{cls} windows hold at most {self._max_offsets} values, got {self.size}")

    def config(self):
        return {"size": list(self.size), "stride": list(self.stride)}

    def output_shape(self, in_shape):
        _require_image(self, in_shape)
        c, h, w = in_shape
        (kh, kw), (sh, sw) = self.size, self.stride
        if h < kh or w < kw:
            raise ValueError(f"{self.name}: a {h}x{w} input is smaller than the {kh}x{kw} window; "
                             f"use a larger input or a smaller window")
        return (c, conv_output_size(h, kh, sh, 0), conv_output_size(w, kw, sw, 0))

    def describe(self):
        return f"{_hw(self.size)}, stride={_hw(self.stride)}"


@register_layer
class MaxPool2D(_Pool2D):
    """Max pooling: (C, N, H, W) -> (C, N, Ho, Wo); the gradient goes to each window's first maximum."""

    kind = "pool"
    _max_offsets = 256          # the argmax is kept as one uint8 window offset

    def __init__(self, size=2, stride=None):
        super().__init__(size, stride)
        self.fused = False          # set by Conv2D.fuse_pool: the conv before it already pooled

    def forward(self, x, train, rng):
        if self.fused:
            return x
        y, self._cache = self.ops.maxpool_forward(x, self.size, self.stride, ws=self._ws)
        return y

    def backward(self, dy, need_dx=True):
        if not need_dx:
            return None
        return dy if self.fused else self.ops.maxpool_backward(dy, self._cache, ws=self._ws)


@register_layer
class AvgPool2D(_Pool2D):
    """Average pooling: (C, N, H, W) -> (C, N, Ho, Wo), each output the mean of its window."""

    kind = "avgpool"

    def forward(self, x, train, rng):
        y, self._cache = self.ops.avgpool_forward(x, self.size, self.stride, ws=self._ws)
        return y

    def backward(self, dy, need_dx=True):
        return self.ops.avgpool_backward(dy, self._cache, ws=self._ws) if need_dx else None


class _Activation(Layer):
    """An elementwise function whose backward needs only its output: ``ops.<kind>_forward/_backward``."""

    def forward(self, x, train, rng):
        self._y = getattr(self.ops, f"{self.kind}_forward")(x, ws=self._ws)
        return self._y

    def backward(self, dy, need_dx=True):
        return getattr(self.ops, f"{self.kind}_backward")(dy, self._y, ws=self._ws) if need_dx else None


@register_layer
class ReLU(_Activation):
    """max(x, 0), any shape."""

    kind = "relu"
    fused = False               # set by Conv2D.fuse_pool: the conv before it already applied it

    def forward(self, x, train, rng):
        return x if self.fused else super().forward(x, train, rng)

    def backward(self, dy, need_dx=True):
        if self.fused:
            return dy if need_dx else None
        return super().backward(dy, need_dx)


@register_layer
class Tanh(_Activation):
    """tanh(x), any shape."""

    kind = "tanh"


@register_layer
class Sigmoid(_Activation):
    """1 / (1 + exp(-x)), any shape."""

    kind = "sigmoid"


@register_layer
class Flatten(Layer):
    """(C, N, H, W) -> (N, C*H*W), features in (c, h, w) order; a flat (N, D) input passes through."""

    kind = "flatten"

    def output_shape(self, in_shape):
        return (math.prod(in_shape),)

    def forward(self, x, train, rng):
        self._shape = x.shape
        return self.ops.flatten(x) if x.ndim == 4 else x

    def backward(self, dy, need_dx=True):
        if not need_dx:
            return None
        return self.ops.unflatten(dy, self._shape) if len(self._shape) == 4 else dy


@register_layer
class Dense(Layer):
    """Fully connected: (N, D) -> (N, K) = x @ w + b with ``w`` (D, K) and ``b`` (K,)."""

    kind = "dense"

    def __init__(self, units: int):
        super().__init__()
        if not isinstance(units, int) or units < 1:
            raise ValueError(f"Dense needs units >= 1, got {units!r}")
        self.units = units

    def config(self):
        return {"units": self.units}

    def param_specs(self, in_shape):
        if len(in_shape) != 1:
            raise ValueError(f"{self.name} needs a flat (D,) input, got {tuple(in_shape)}; put a Flatten before it")
        return [("w", (in_shape[0], self.units), in_shape[0]), ("b", (self.units,), 0)]

    def output_shape(self, in_shape):
        self.param_specs(in_shape)
        return (self.units,)

    def forward(self, x, train, rng):
        self._x = x
        return self.ops.dense_forward(x, self.params["w"], self.params["b"])

    def backward(self, dy, need_dx=True):
        return self.ops.dense_backward(dy, self._x, self.params["w"], self.grads["w"], self.grads["b"],
                                       need_dx=need_dx)

    def describe(self):
        return str(self.units)


@register_layer
class Dropout(Layer):
    """Inverted dropout: in training, zero each value with probability ``rate`` and scale the rest by 1/(1-rate)."""

    kind = "dropout"

    def __init__(self, rate: float):
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"Dropout rate must be in [0, 1), got {rate}")
        self.rate = float(rate)

    def config(self):
        return {"rate": self.rate}

    def forward(self, x, train, rng):
        if not train or self.rate == 0.0:
            self._mask = None
            return x
        self._mask = self.ops.dropout_mask(x.shape, self.rate, rng, x.dtype)
        return x * self._mask

    def backward(self, dy, need_dx=True):
        if not need_dx:
            return None
        return dy if self._mask is None else dy * self._mask

    def describe(self):
        return str(self.rate)
