"""Network: a stack of layers on ONE flat parameter vector and ONE flat gradient vector.

Every layer's weights are views into ``net.params`` and its gradients views into ``net.grads``, so the parameter
store, the optimizers and checkpoints move a single contiguous buffer, and ``net.params[...] = v`` changes the model.
"""
from __future__ import annotations

import math

import numpy

from asyncsgd.model.layers import Conv2D, Layer, MaxPool2D, layer_from_spec

__all__ = ["Network"]


class Network:
    """A feed-forward classifier ending in softmax cross-entropy.

    Inputs ``x`` are ``(N, C, H, W)`` (or ``(N, D)`` for a flat ``input_shape``) in the backend's memory, of the
    network's dtype (other float dtypes are converted); labels ``y`` are integer ``(N,)`` in ``[0, n_classes)``.
    ``fuse`` lets a stride-1 Conv2D compute the 2x2 MaxPool2D after it, and a ReLU after that, in one step (same
    values, less memory traffic).

    ``spec()`` describes the architecture as JSON-able data and ``Network.from_spec`` rebuilds it, which is how a
    saved model (``asyncsgd.model.save_model``/``load_model``) is rebuilt without the code that first built it.
    """

    def __init__(self, name: str, layers: list[Layer], input_shape, n_classes: int, *, ops, dtype=numpy.float32,
                 seed: int = 0, fuse: bool = True):
        self.name = name
        self.factory = None         # what resolve_model named the factory, set by build_model; a saved model keeps it
        self.layers = list(layers)
        self.input_shape = tuple(int(d) for d in input_shape)
        self.n_classes = int(n_classes)
        self.ops = ops
        self.xp = ops.xp
        self.dtype = numpy.dtype(dtype)
        if self.dtype not in (numpy.float32, numpy.float64):
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype}")
        self.seed = int(seed)
        self._rng = ops.make_rng(self.seed + 1)   # dropout masks when the caller passes no rng

        layout, shape, counts = [], self.input_shape, {}
        for layer in self.layers:
            counts[layer.kind] = counts.get(layer.kind, 0) + 1
            layer.name = f"{layer.kind}{counts[layer.kind]}"
            for suffix, pshape, fan_in in layer.param_specs(shape):
                layout.append((f"{layer.name}.{suffix}", pshape, fan_in))
            shape = layer.output_shape(shape)
        if shape != (self.n_classes,):
            raise ValueError(f"network {name!r} ends in shape {shape}, expected ({self.n_classes},) logits")
        self.output_shape = shape

        self._layout, offset = [], 0
        for pname, pshape, fan_in in layout:
            self._layout.append((pname, offset, tuple(pshape), fan_in))
            offset += math.prod(pshape)
        self.n_params = offset
        self.params = self.xp.zeros(self.n_params, self.dtype)
        self.grads = self.xp.zeros(self.n_params, self.dtype)
        for layer in self.layers:
            pv, gv = {}, {}
            for pname, off, pshape, _ in self._layout:
                lname, suffix = pname.split(".")
                if lname == layer.name:
                    size = math.prod(pshape)
                    pv[suffix] = self.params[off:off + size].reshape(pshape)
                    gv[suffix] = self.grads[off:off + size].reshape(pshape)
            layer.bind(ops, pv, gv)
        if fuse:
            after = self.layers[2:] + [None]
            for conv, pool, relu in zip(self.layers, self.layers[1:], after):
                if isinstance(conv, Conv2D) and isinstance(pool, MaxPool2D):
                    conv.fuse_pool(pool, relu)
        with_params = [i for i, layer in enumerate(self.layers) if layer.params]
        self._first_param_layer = with_params[0] if with_params else len(self.layers)
        self.initialize(self.seed)

    # ---- architecture ---------------------------------------------------------------------------------------------
    def spec(self) -> list:
        """Return the layers as a JSON-able list of ``Layer.spec()`` dicts (with the input shape and class count,
        what ``Network.from_spec`` needs)."""
        return [layer.spec() for layer in self.layers]

    @classmethod
    def from_spec(cls, name: str, spec, input_shape, n_classes: int, *, ops, dtype=numpy.float32, seed: int = 0,
                  fuse: bool = True) -> "Network":
        """Return a new network of the layers ``spec`` (as ``spec()`` returned), initialised from ``seed``."""
        if not isinstance(spec, (list, tuple)) or not spec:
            raise ValueError(f"a network spec is a non-empty list of layer specs, got {spec!r}")
        return cls(name, [layer_from_spec(s) for s in spec], input_shape, n_classes, ops=ops, dtype=dtype,
                   seed=seed, fuse=fuse)

    def astype(self, dtype, ops=None) -> "Network":
        """Return a copy of this network (same layers, parameters cast to ``dtype``) on ``ops`` (default: its own)."""
        ops = self.ops if ops is None else ops
        copy = Network.from_spec(self.name, self.spec(), self.input_shape, self.n_classes, ops=ops, dtype=dtype,
                                 seed=self.seed)
        copy.params[...] = ops.to_device(self.ops.to_host(self.params).astype(copy.dtype))
        return copy

    # ---- parameters -----------------------------------------------------------------------------------------------
    def param_layout(self):
        """Return ``[(name, offset, shape), ...]`` in vector order, e.g. ``('conv1.w', 0, (16, 1, 5, 5))``."""
        return [(pname, off, pshape) for pname, off, pshape, _ in self._layout]

    def initialize(self, seed: int):
        """Overwrite the parameters with He-normal weights (std sqrt(2/fan_in)) and zero biases, drawn from ``seed``.

        Draws are made on the host in float64 with numpy's PCG64, so every backend and dtype starts from the same
        values (up to rounding).
        """
        rng = numpy.random.default_rng(seed)
        host = numpy.zeros(self.n_params, numpy.float64)
        for pname, off, pshape, fan_in in self._layout:
            if fan_in:
                size = math.prod(pshape)
                host[off:off + size] = rng.standard_normal(size) * math.sqrt(2.0 / fan_in)
        self.params[...] = self.xp.asarray(host.astype(self.dtype))

    # ---- computation ----------------------------------------------------------------------------------------------
    def _check_input(self, x, y=None):
        xp = self.xp
        x = xp.asarray(x)
        if x.ndim != len(self.input_shape) + 1 or tuple(x.shape[1:]) != self.input_shape:
            raise ValueError(f"{self.name} expects input of shape (N, {', '.join(map(str, self.input_shape))}), "
                             f"got {tuple(x.shape)}")
        if x.dtype != self.dtype:
            x = x.astype(self.dtype)
        if y is not None:
            y = xp.asarray(y)
            if y.shape != (x.shape[0],):
                raise ValueError(f"labels must have shape ({x.shape[0]},) to match the inputs, got {tuple(y.shape)}")
            if y.dtype.kind not in "iu":
                raise ValueError(f"labels must be integers, got dtype {y.dtype}")
        return x, y

    def _forward(self, x, train, rng):
        h = self.ops.nchw_to_cnhw(x) if x.ndim == 4 else x
        with self.ops.pass_section():
            for layer in self.layers:
                h = layer.forward(h, train, rng)
        return h

    def forward(self, x, train: bool = False, rng=None):
        """Return logits (N, n_classes) for inputs x (N, C, H, W); ``train`` turns dropout on (masks from ``rng``,
        a generator of ``ops.make_rng`` or numpy; the network's own generator when None)."""
        x, _ = self._check_input(x)
        if train and rng is None:
            rng = self._rng
        return self._forward(x, train, rng).copy()

    def loss_and_grad(self, x, y, rng=None) -> float:
        """Return the mean softmax cross-entropy of batch (x, y) with dropout on, and OVERWRITE ``self.grads`` with its
        gradient w.r.t. ``self.params``."""
        x, y = self._check_input(x, y)
        logits = self._forward(x, True, self._rng if rng is None else rng)
        loss, d = self.ops.softmax_cross_entropy(logits, y)
        with self.ops.pass_section():
            for i in range(len(self.layers) - 1, -1, -1):
                d = self.layers[i].backward(d, need_dx=self._needs_dx(i))
        return float(loss)

    def _needs_dx(self, i):
        # Below the first layer with parameters the input gradient would be thrown away: skip computing it.
        return i > self._first_param_layer

    def loss(self, x, y) -> float:
        """Return the mean softmax cross-entropy of (x, y) in evaluation mode (no dropout, no gradient)."""
        x, y = self._check_input(x, y)
        loss, _ = self.ops.softmax_cross_entropy(self._forward(x, False, None), y, need_grad=False)
        return float(loss)

    def evaluate(self, x, y, batch_size: int = 256):
        """Return ``(mean_loss, accuracy)`` over (x, y) in evaluation mode, ``batch_size`` rows at a time.

        x and y may be host (numpy) arrays on a GPU backend: each batch is moved to the device on its own.
        """
        n = len(y)
        if n == 0:
            raise ValueError("evaluate needs at least one example")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        total_loss, correct = 0.0, 0
        for start in range(0, n, batch_size):
            xb, yb = self._check_input(x[start:start + batch_size], y[start:start + batch_size])
            lsum, hits = self.ops.sum_loss_and_correct(self._forward(xb, False, None), yb)
            total_loss += float(lsum)
            correct += int(hits)
        return total_loss / n, correct / n

    def summary(self) -> str:
        """Return a multi-line description: layers, output shapes, parameter count."""
        lines, shape = [f"{self.name}: input {self.input_shape}, {self.n_params} parameters ({self.dtype})"], \
            self.input_shape
        for layer in self.layers:
            shape = layer.output_shape(shape)
            lines.append(f"  {layer.name:<10} {layer!r:<40} -> {shape}")
        return "\n".join(lines)

    def __repr__(self):
        return f"Network({self.name!r}, input_shape={self.input_shape}, n_params={self.n_params})"

