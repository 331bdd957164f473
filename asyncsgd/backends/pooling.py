"""Pooling primitives of ``NumpyOps`` (``PoolOps``): max and average pooling without padding.

The numpy versions make one pass per window offset (``CupyOps`` overrides them with one kernel each); caches are
opaque, read only by the matching backward.  Written against ``self.xp``.
"""
from __future__ import annotations

import numpy

from asyncsgd.backends.workspace import cached_buffer, conv_output_size, pair

__all__ = ["PoolOps"]


class PoolOps:
    """The pooling methods of ``NumpyOps`` (a mixin: it needs ``self.xp``)."""

    @staticmethod
    def _pool_shape(xshape, size, stride, kind):
        """Return ((kh, kw), (sh, sw), (Ho, Wo)) of a pooling without padding; ValueError when the window misfits
        (or, for ``kind`` "maxpool", has more offsets than its uint8 argmax holds)."""
        (kh, kw), (sh, sw) = pair(size, "size"), pair(stride, "stride")
        _, _, h, wd = xshape
        if kh < 1 or kw < 1 or sh < 1 or sw < 1:
            raise ValueError(f"{kind}: window and stride must be >= 1, got {kh}x{kw} and {sh}x{sw}")
        ho, wo = conv_output_size(h, kh, sh, 0), conv_output_size(wd, kw, sw, 0)
        if ho < 1 or wo < 1:
            raise ValueError(f"{kind}: input {h}x{wd} is smaller than the {kh}x{kw} window")
        if kind == "maxpool" and kh * kw > 256:
            raise ValueError(f"maxpool: a {kh}x{kw} window has more offsets than the uint8 argmax can hold "
                             f"(at most 256)")
        return (kh, kw), (sh, sw), (ho, wo)

    def maxpool_forward(self, x, size, stride, ws=None):
        """Return ``(y, cache)`` of max pooling over ``size`` windows (int or (kh, kw)), no padding.

        x: (C, N, H, W); y: (C, N, Ho, Wo) with ``Ho = (H - kh)//stride_h + 1`` (likewise Wo); rows/columns past the
        last full window are ignored.  The gradient goes to the first maximum of each window in row-major window
        order (PyTorch's choice), recorded in ``cache`` as a uint8 window offset ``p*kw + q`` per output.
        """
        xp = self.xp
        ws = {} if ws is None else ws
        (kh, kw), (sh, sw), (ho, wo) = self._pool_shape(x.shape, size, stride, "maxpool")
        c, n, _, _ = x.shape
        y = cached_buffer(ws, "y", (c, n, ho, wo), x.dtype, xp)
        arg = cached_buffer(ws, "arg", (c, n, ho, wo), numpy.uint8, xp)
        gt = cached_buffer(ws, "gt", (c, n, ho, wo), numpy.bool_, xp)
        last_h, last_w = sh * (ho - 1) + 1, sw * (wo - 1) + 1
        y[...] = x[:, :, 0:last_h:sh, 0:last_w:sw]
        arg.fill(0)
        t = 0
        for p in range(kh):
            for q in range(kw):
                if t:
                    cand = x[:, :, p:p + last_h:sh, q:q + last_w:sw]
                    xp.greater(cand, y, out=gt)
                    xp.multiply(arg, ~gt, out=arg)         # masked assignment arg[gt] = t without copyto(where=),
                    arg += gt.view(numpy.uint8) * numpy.uint8(t)   # which is ~40x slower in numpy
                    xp.maximum(y, cand, out=y)
                t += 1
        return y, (x.shape, (kh, kw), (sh, sw), arg)

    def _window_views(self, dx, dy_shape, size, stride):
        """Yield, for every window offset (p, q) in row-major order, the view of ``dx`` that offset reads."""
        (kh, kw), (sh, sw) = size, stride
        _, _, ho, wo = dy_shape
        last_h, last_w = sh * (ho - 1) + 1, sw * (wo - 1) + 1
        for p in range(kh):
            for q in range(kw):
                yield dx[:, :, p:p + last_h:sh, q:q + last_w:sw]

    @staticmethod
    def _pool_dx_needs_zero(xshape, size, stride, pooled):
        """Return (overlap, zero first): windows overlap, or some input element is in no window."""
        (kh, kw), (sh, sw), (ho, wo) = size, stride, pooled
        overlap = sh < kh or sw < kw
        covered = sh == kh and sw == kw and xshape[2] == kh * ho and xshape[3] == kw * wo
        return overlap, overlap or not covered

    def maxpool_backward(self, dy, cache, ws=None):
        """Return dx (C, N, H, W) of ``maxpool_forward`` for dy (C, N, Ho, Wo): dy routed to each window's argmax."""
        xp = self.xp
        ws = {} if ws is None else ws
        xshape, size, stride, arg = cache
        dx = cached_buffer(ws, "dx", xshape, dy.dtype, xp)
        overlap, zero = self._pool_dx_needs_zero(xshape, size, stride, dy.shape[2:])
        if zero:
            dx.fill(0)
        hit = cached_buffer(ws, "hit", dy.shape, numpy.bool_, xp)
        for t, dst in enumerate(self._window_views(dx, dy.shape, size, stride)):
            xp.equal(arg, t, out=hit)
            if overlap:
                dst += dy * hit
            else:
                xp.multiply(dy, hit, out=dst)
        return dx

    def avgpool_forward(self, x, size, stride, ws=None):
        """Return ``(y, cache)`` of average pooling over ``size`` windows (int or (kh, kw)), no padding.

        x: (C, N, H, W); y: (C, N, Ho, Wo) as ``maxpool_forward``; ``y = (sum of the window in row-major order) *
        scale`` with ``scale = 1/(kh*kw)`` rounded to x's dtype (the GPU kernel rounds the same way).
        """
        xp = self.xp
        ws = {} if ws is None else ws
        (kh, kw), (sh, sw), (ho, wo) = self._pool_shape(x.shape, size, stride, "avgpool")
        c, n, _, _ = x.shape
        y = cached_buffer(ws, "y", (c, n, ho, wo), x.dtype, xp)
        for t, src in enumerate(self._window_views(x, y.shape, (kh, kw), (sh, sw))):
            if t:
                y += src
            else:
                y[...] = src
        y *= x.dtype.type(1.0 / (kh * kw))
        return y, (x.shape, (kh, kw), (sh, sw))

    def avgpool_backward(self, dy, cache, ws=None):
        """Return dx (C, N, H, W) of ``avgpool_forward``: ``dy * scale`` added to every element of each window."""
        xp = self.xp
        ws = {} if ws is None else ws
        xshape, size, stride = cache
        dx = cached_buffer(ws, "dx", xshape, dy.dtype, xp)
        overlap, zero = self._pool_dx_needs_zero(xshape, size, stride, dy.shape[2:])
        if zero:
            dx.fill(0)
        g = cached_buffer(ws, "g", dy.shape, dy.dtype, xp)
        xp.multiply(dy, dy.dtype.type(1.0 / (size[0] * size[1])), out=g)
        for dst in self._window_views(dx, dy.shape, size, stride):
            if overlap:
                dst += g
            else:
                dst[...] = g
        return dx
