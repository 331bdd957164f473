"""Network layers: Conv2D, MaxPool2D, ReLU, Flatten, Dense, Dropout.

Every layer works on one mini-batch at a time and keeps what its backward pass needs from the last forward pass.
Image activations are channel-major ``(C, N, H, W)`` (see ``ops``); flat ones are ``(N, D)``.  Shapes given to
``output_shape`` are per sample, as the user sees them: ``(C, H, W)`` or ``(D,)``.

Parameters are not owned by the layers: ``Network`` hands each layer views into its flat parameter and gradient
vectors (``bind``), so the weights a layer reads are always the network's current vector, and ``backward`` writes
its gradients into the network's gradient vector.  Layers do array work only through ``self.ops`` and
``self.ops.xp``, so the GPU subclass of the ops runs them unchanged.
"""
from __future__ import annotations

import math

from .ops import conv_output_size

__all__ = ["Layer", "Conv2D", "MaxPool2D", "ReLU", "Flatten", "Dense", "Dropout"]


class Layer:
    """Base class: a layer without parameters whose forward is the identity."""

    kind = "layer"

    def __init__(self):
        self.name = self.kind
        self.ops = None
        self.params = {}
        self.grads = {}
        self._ws = {}

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
        return ""

    def __repr__(self):
        return f"{type(self).__name__}({self.describe()})"


def _require_image(layer, in_shape):
    if len(in_shape) != 3:
        raise ValueError(f"{layer.kind} needs a (C, H, W) input, got shape {tuple(in_shape)}; put it before Flatten")


class Conv2D(Layer):
    """2-D convolution: (C, N, H, W) -> (F, N, Ho, Wo); weights ``w`` (F, C, kh, kw) and bias ``b`` (F,)."""

    kind = "conv"

    def __init__(self, filters: int, kernel: int | tuple, stride: int = 1, pad: int = 0):
        super().__init__()
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        if filters < 1 or kh < 1 or kw < 1 or stride < 1 or pad < 0:
            raise ValueError(f"Conv2D needs filters, kernel, stride >= 1 and pad >= 0, got "
                             f"filters={filters}, kernel={kernel}, stride={stride}, pad={pad}")
        self.filters, self.kh, self.kw, self.stride, self.pad = filters, kh, kw, stride, pad
        self.fused_pool = None

    def fuse_pool(self, pool):
        """Compute ``pool`` (a following 2x2/2 MaxPool2D) inside this layer with ``ops.conv2d_maxpool_*``.

        Returns True when fused; the pool layer then passes values and gradients through unchanged.
        """
        if self.stride != 1 or pool.size != 2 or pool.stride != 2 or not self.ops.fuses_conv_pool:
            return False
        self.fused_pool, pool.fused = pool, True
        return True

    def param_specs(self, in_shape):
        _require_image(self, in_shape)
        c = in_shape[0]
        return [("w", (self.filters, c, self.kh, self.kw), c * self.kh * self.kw), ("b", (self.filters,), 0)]

    def output_shape(self, in_shape):
        _require_image(self, in_shape)
        _, h, w = in_shape
        ho = conv_output_size(h, self.kh, self.stride, self.pad)
        wo = conv_output_size(w, self.kw, self.stride, self.pad)
        if ho < 1 or wo < 1:
            raise ValueError(f"{self.name}: a {h}x{w} input is smaller than its {self.kh}x{self.kw} kernel "
                             f"(pad {self.pad}); use a larger input or fewer pooling layers")
        return (self.filters, ho, wo)

    def forward(self, x, train, rng):
        w, b = self.params["w"], self.params["b"]
        if self.fused_pool is not None:
            y, self._cache = self.ops.conv2d_maxpool_forward(x, w, b, self.pad, ws=self._ws)
        else:
            y, self._cache = self.ops.conv2d_forward(x, w, b, self.stride, self.pad, ws=self._ws)
        return y

    def backward(self, dy, need_dx=True):
        backward = self.ops.conv2d_maxpool_backward if self.fused_pool is not None else self.ops.conv2d_backward
        return backward(dy, self._cache, self.params["w"], self.grads["w"], self.grads["b"], need_dx=need_dx,
                        ws=self._ws)

    def describe(self):
        return f"{self.filters}, {self.kh}x{self.kw}, stride={self.stride}, pad={self.pad}"


class MaxPool2D(Layer):
    """Max pooling over ``size`` x ``size`` windows, ``stride`` (default ``size``): (C, N, H, W) -> (C, N, Ho, Wo)."""

    kind = "pool"

    def __init__(self, size: int = 2, stride: int | None = None):
        super().__init__()
        stride = size if stride is None else stride
        if not 1 <= size <= 16 or stride < 1:
            raise ValueError(f"MaxPool2D needs 1 <= size <= 16 and stride >= 1, got size={size}, stride={stride}")
        self.size, self.stride = size, stride
        self.fused = False          # set by Conv2D.fuse_pool: the conv before it already pooled

    def output_shape(self, in_shape):
        _require_image(self, in_shape)
        c, h, w = in_shape
        if h < self.size or w < self.size:
            raise ValueError(f"{self.name}: a {h}x{w} input is smaller than the {self.size}x{self.size} window; "
                             f"use a larger input")
        return (c, conv_output_size(h, self.size, self.stride, 0), conv_output_size(w, self.size, self.stride, 0))

    def forward(self, x, train, rng):
        if self.fused:
            return x
        y, self._cache = self.ops.maxpool_forward(x, self.size, self.stride, ws=self._ws)
        return y

    def backward(self, dy, need_dx=True):
        if not need_dx:
            return None
        return dy if self.fused else self.ops.maxpool_backward(dy, self._cache, ws=self._ws)

    def describe(self):
        return f"{self.size}, stride={self.stride}"


class ReLU(Layer):
    """max(x, 0), any shape."""

    kind = "relu"

    def forward(self, x, train, rng):
        self._y = self.ops.relu_forward(x, ws=self._ws)
        return self._y

    def backward(self, dy, need_dx=True):
        return self.ops.relu_backward(dy, self._y, ws=self._ws) if need_dx else None


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


class Dense(Layer):
    """Fully connected: (N, D) -> (N, K) = x @ w + b with ``w`` (D, K) and ``b`` (K,)."""

    kind = "dense"

    def __init__(self, units: int):
        super().__init__()
        if units < 1:
            raise ValueError(f"Dense needs units >= 1, got {units}")
        self.units = units

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


class Dropout(Layer):
    """Inverted dropout: in training, zero each value with probability ``rate`` and scale the rest by 1/(1-rate)."""

    kind = "dropout"

    def __init__(self, rate: float):
        super().__init__()
        if not 0.0 <= rate < 1.0:
            raise ValueError(f"Dropout rate must be in [0, 1), got {rate}")
        self.rate = rate

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
