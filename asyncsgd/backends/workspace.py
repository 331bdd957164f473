"""Workspaces and window shapes, shared by every layer primitive of every backend.

Workspaces.  Methods taking ``ws`` receive a dict that the calling layer keeps between calls; a method may keep
reusable buffers in it (``cached_buffer``, keyed by what it needs) so a training loop allocates nothing after its
first step.  Arrays a method returns may live in ``ws``: they are valid until the next call with the same ``ws``,
which is how the layers use them (forward of step t+1 starts after backward of step t).

Sizes of windows, strides and paddings are an int (square) or an ``(h, w)`` pair; ``pair()`` normalises them and
``conv_output_size`` gives the output length of a window along one axis.
"""
from __future__ import annotations

import numpy

__all__ = ["cached_buffer", "conv_output_size", "pair"]




def cached_buffer(ws, key, shape, dtype, xp, zero=False):
    """Return a cached array of ``shape``/``dtype`` from ``ws`` (allocated on first use or when the shape changes).

    ``zero`` zeroes a freshly allocated buffer only; callers rely on this to keep zero borders between calls.
    """
    buf = ws.get(key)
    if buf is None or buf.shape != tuple(shape) or buf.dtype != dtype:
        buf = xp.zeros(shape, dtype) if zero else xp.empty(shape, dtype)
        ws[key] = buf
    return buf


def pair(value, name: str = "size") -> tuple[int, int]:
    """Return ``value`` (an int or a 2-sequence of ints) as ``(h, w)``; TypeError/ValueError naming ``name``."""
    if isinstance(value, (int, numpy.integer)) and not isinstance(value, bool):
        return int(value), int(value)
    try:
        h, w = value
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be an int or an (h, w) pair of ints, got {value!r}") from None
    for v in (h, w):
        if not isinstance(v, (int, numpy.integer)) or isinstance(v, bool):
            raise TypeError(f"{name} must be an int or an (h, w) pair of ints, got {value!r}")
    return int(h), int(w)


def conv_output_size(size: int, kernel: int, stride: int, pad: int) -> int:
    """Return the output length of a convolution or pooling window along one axis (floor division)."""
    return (size + 2 * pad - kernel) // stride + 1
