"""The fused stride-1 convolution + 2x2/2 max pool (+ ReLU) of ``NumpyOps`` (``ConvPoolOps``).

``conv2d_maxpool_forward``/``conv2d_maxpool_backward`` replace a stride-1 ``conv2d_*`` followed by a 2x2/2
``maxpool_*`` (and on NumpyOps optionally a ReLU) with the same values and gradient routing; ``NumpyOps.fuses_conv_pool``
says when a network may use them.  Why it is faster is stated at ``conv2d_maxpool_forward``.

Threads.  ``NumpyOps(threads=T)`` runs the fused conv+pool of a batch as T batch parts at once, each part's GEMMs on
one BLAS thread (``asyncsgd.backends.threads``); the results equal one thread's up to the order in which the parts'
weight gradients are summed.

Compiled kernels.  Where the optional extension ``_asyncsgd_cpu`` is built, the fused conv+pool runs its copies and
masks in C (``asyncsgd.backends.cpu_kernels``) on float32, bit-identical to the numpy code here, which runs
otherwise (float64, no build, ``ASYNCSGD_CPU_KERNELS=0``); ``ops.cpu_kernels_on`` says which.
"""
from __future__ import annotations

import numpy

from asyncsgd.backends import cpu_kernels
from asyncsgd.backends.threads import split_batch
from asyncsgd.backends.workspace import cached_buffer, pair
from asyncsgd.runtime.faults import fault_point

__all__ = ["ConvPoolOps"]


def _plane_windows(kh: int, kw: int, wq: int, run: int):
    """Yield ``(column, plane)`` index tuples: for kernel offset (p, q) and output parity (a, b), the slab
    ``[:, p, q, a, b]`` of the (C, kh, kw, 2, 2, n, run) columns and the run of the (2, 2, C, n, Hq*Wq) parity
    planes it copies: plane ((a+p)%2, (b+q)%2) at offset ((a+p)//2, (b+q)//2), unit stride."""
    for p in range(kh):
        for q in range(kw):
            for a in (0, 1):
                for b in (0, 1):
                    u, v = a + p, b + q
                    off = (u // 2) * wq + v // 2
                    yield (slice(None), p, q, a, b), (u % 2, v % 2, slice(None), slice(None), slice(off, off + run))


class ConvPoolOps:
    """The fused conv + max pool of ``NumpyOps`` (a mixin: it needs ``self.xp``, ``self.threads``,
    ``self.cpu_kernels_on``, ``self._run_parts`` and the convolution GEMM of ``ConvOps``)."""

    def conv2d_maxpool_forward(self, x, w, b, pad, ws=None, relu: bool = False):
        """Return ``(y, cache)`` of a stride-1 ``conv2d_forward`` followed by ``maxpool_forward`` with size 2, stride 2.

        x: (C, N, H, W); w: (F, C, kh, kw); b: (F,); ``pad`` an int or (h, w) pair; y: (F, N, Ho//2, Wo//2) with
        ``Ho = H + 2*pad_h - kh + 1`` (likewise Wo), possibly a non-contiguous view.  Values and the routing of
        gradients to each window's first maximum equal the unfused pair; conv outputs the pooling ignores (an odd last
        row or column) are not computed.  ``relu=True`` also applies a following ReLU (``max(y, 0)``, and its mask
        in the backward pass), as ``relu_forward``/``relu_backward`` would.

        Why it is faster (memory traffic, not FLOPs, bounds numpy here):
        - the GEMM's columns are ordered (a, b, n, i, j) for conv output row 2i+a, column 2j+b, so the four members of
          every pooling window lie in four contiguous slabs and pooling is a few vectorised maxima;
        - the padded input is split once into its four row/column parity planes ("polyphase"), so window (p, q) of
          output parity (a, b) reads plane ((a+p)%2, (b+q)%2) at offset ((a+p)//2, (b+q)//2) with unit stride;
        - each output row j runs over the plane's full width Wq instead of Wo//2, so one copy per image is a single
          run of (Ho//2)*Wq values; the few extra columns are junk that is never returned and gets zero gradient;
        - with ``threads`` > 1 the batch is split into one part per thread, each part doing all of the above (GEMM
          included, on one BLAS thread) at once; the backward sums the parts' weight gradients in part order.
        """
        xp = self.xp
        ws = {} if ws is None else ws
        pad = pair(pad, "pad")
        c, n, h, wd = x.shape
        f, c2, kh, kw = w.shape
        if c2 != c:
            raise ValueError(f"conv2d: input has {c} channels but the weights expect {c2}")
        hh, wh = (h + 2 * pad[0] - kh + 1) // 2, (wd + 2 * pad[1] - kw + 1) // 2
        if hh < 1 or wh < 1:
            raise ValueError(f"conv2d+maxpool: input {h}x{wd} gives no 2x2 pooling window after the {kh}x{kw} conv")
        wq = (wd + 2 * pad[1] + 1) // 2
        run = hh * wq
        out = cached_buffer(ws, "pooled", (f, n * run), x.dtype, xp)
        parts = self._batch_parts(n)
        subs = self._part_workspaces(ws, len(parts))

        def part(i):
            n0, n1 = parts[i]
            return self._conv_pool_part(x[:, n0:n1], w, b, pad, subs[i], out[:, n0 * run:n1 * run], relu)

        caches = self._run_parts(part, len(parts))
        cache = (x.shape, pad, hh, wh, wq, relu, parts, caches, out)
        return out.reshape(f, n, hh, wq)[:, :, :, :wh], cache

    def _runs_cpu_kernels(self, dtype) -> bool:
        """True when the fused conv+pool of ``dtype`` arrays runs in asyncsgd.backends.cpu_kernels (float32 only)."""
        return self.cpu_kernels_on and dtype == numpy.float32

    def _batch_parts(self, n):
        """Return the [(start, stop), ...] parts of a batch of ``n`` that run at once (one part on one thread)."""
        threads = getattr(self, "threads", 1)
        return [(0, n)] if threads <= 1 else split_batch(n, threads)

    @staticmethod
    def _part_workspaces(ws, count):
        subs = ws.get("parts")
        if subs is None or len(subs) != count:
            subs = ws["parts"] = [{} for _ in range(count)]
        return subs

    def _conv_pool_part(self, x, w, b, pad, ws, out, relu):
        """The fused forward of one batch part: writes the pooled values into ``out`` (F, n*run); returns its cache."""
        fault_point("conv")  # test tool: an exception inside a batch part (on an intra-op thread, where there are some)
        xp = self.xp
        ph, pw = pad
        c, n, h, wd = x.shape
        f, _, kh, kw = w.shape
        hh = (h + 2 * ph - kh + 1) // 2
        hq, wq = (h + 2 * ph + 1) // 2 + 1, (wd + 2 * pw + 1) // 2   # +1 row: slack for the last run's junk tail
        k, run = c * kh * kw, hh * wq
        m = n * run
        if self._runs_cpu_kernels(x.dtype):                 # the same columns and maxima, made in C
            col = self.conv_columns(ws, k, 4 * m, x.dtype)
            cpu_kernels.im2col(x, col, kh, kw, pad, hq, wq, run)
            y = self.conv_gemm_forward(w, b, col, ws).reshape(f, 4, m)
            arg = cached_buffer(ws, "arg", (f, m), numpy.uint8, xp)
            cpu_kernels.max4(y, out, arg, relu)
            return (x.shape, col, arg)
        planes = cached_buffer(ws, "planes", (2, 2, c, n, hq, wq), x.dtype, xp, zero=True)
        for r in (0, 1):
            for s in (0, 1):
                src, dst = self._parity_slices(x.shape, pad, r, s)
                planes[r, s][dst] = x[src]                  # borders stay zero from allocation
        flat = planes.reshape(2, 2, c, n, hq * wq)
        col = self.conv_columns(ws, k, 4 * m, x.dtype)
        col8 = col[:k].reshape(c, kh, kw, 2, 2, n, run)
        for column, plane in _plane_windows(kh, kw, wq, run):
            col8[column] = flat[plane]
        y = self.conv_gemm_forward(w, b, col, ws).reshape(f, 4, m)
        arg = self._max4(y, ws, out)
        if relu:
            xp.maximum(out, 0, out=out)
        return (x.shape, col, arg)

    def _max4(self, y, ws, out):
        """Write the max over axis 1 of y (F, 4, M) into ``out`` (F, M); return the index of the first maximum (uint8).

        Vectorised maxima; the index is built from three comparisons as 2*g23 + (g3 if g23 else g1) without any
        masked assignment.
        """
        xp = self.xp
        f, _, m = y.shape
        m23 = cached_buffer(ws, "m23", (f, m), y.dtype, xp)
        g1, g3, g23 = (cached_buffer(ws, key, (f, m), numpy.bool_, xp) for key in ("g1", "g3", "g23"))
        xp.greater(y[:, 1], y[:, 0], out=g1)
        xp.greater(y[:, 3], y[:, 2], out=g3)
        xp.maximum(y[:, 0], y[:, 1], out=out)
        xp.maximum(y[:, 2], y[:, 3], out=m23)
        xp.greater(m23, out, out=g23)
        xp.maximum(out, m23, out=out)
        arg = cached_buffer(ws, "arg", (f, m), numpy.uint8, xp)
        u1, u3, u23 = g1.view(numpy.uint8), g3.view(numpy.uint8), g23.view(numpy.uint8)
        xp.bitwise_xor(u1, u3, out=arg)
        xp.bitwise_and(arg, u23, out=arg)
        xp.bitwise_xor(arg, u1, out=arg)                   # g3 where g23 else g1
        xp.left_shift(u23, 1, out=u23)
        xp.bitwise_or(arg, u23, out=arg)
        return arg

    @staticmethod
    def _parity_slices(xshape, pad, r, s):
        """Return (source slices of x, destination slices of a parity plane) for padded-row parity r, column s;
        ``pad`` is the (h, w) padding."""
        _, _, h, wd = xshape
        ph, pw = pad
        h0, w0 = (r - ph) % 2, (s - pw) % 2
        nh, nw = len(range(h0, h, 2)), len(range(w0, wd, 2))
        i0, j0 = (h0 + ph) // 2, (w0 + pw) // 2
        return ((slice(None), slice(None), slice(h0, h, 2), slice(w0, wd, 2)),
                (slice(None), slice(None), slice(i0, i0 + nh), slice(j0, j0 + nw)))

    def conv2d_maxpool_backward(self, dy, cache, w, dw, db, need_dx: bool = True, ws=None):
        """Write dL/dw, dL/db of ``conv2d_maxpool_forward`` into ``dw`` (F, C, kh, kw) and ``db`` (F,); return dx.

        dy: (F, N, Ho//2, Wo//2); returns dx: (C, N, H, W), or None when ``need_dx`` is False.
        """
        xp = self.xp
        ws = {} if ws is None else ws
        xshape, pad, hh, wh, wq, relu, parts, caches, out = cache
        c, n, h, wd = xshape
        run = hh * wq
        subs = self._part_workspaces(ws, len(parts))
        dx = cached_buffer(ws, "dx", xshape, dy.dtype, xp) if need_dx else None
        grads = [(dw, db)] if len(parts) == 1 else \
            [(cached_buffer(sub, "dw", dw.shape, dw.dtype, xp), cached_buffer(sub, "db", db.shape, db.dtype, xp))
             for sub in subs]

        def part(i):
            n0, n1 = parts[i]
            self._conv_pool_part_backward(dy[:, n0:n1], caches[i], w, grads[i][0], grads[i][1],
                                          None if dx is None else dx[:, n0:n1], subs[i], pad, hh, wh, wq,
                                          out[:, n0 * run:n1 * run] if relu else None)

        self._run_parts(part, len(parts))
        if len(parts) > 1:
            dw[...] = grads[0][0]
            db[...] = grads[0][1]
            for gw, gb in grads[1:]:
                dw += gw
                db += gb
        return dx

    def _conv_pool_part_backward(self, dy, cache, w, dw, db, dx, ws, pad, hh, wh, wq, relu_out):
        """The fused backward of one batch part: overwrites dw/db, writes dx (a view, or None: not needed)."""
        xp = self.xp
        xshape, col, arg = cache
        c, n, h, wd = xshape
        f, _, kh, kw = w.shape
        run = hh * wq
        m = n * run
        hq = (h + 2 * pad[0] + 1) // 2 + 1
        if self._runs_cpu_kernels(dy.dtype):                # the same gradients, routed and summed in C
            dconv = cached_buffer(ws, "dconv", (f, 4, m), dy.dtype, xp)
            cpu_kernels.pool_grad(dy, relu_out, arg, dconv, wq)
            dcol = self.conv_gemm_backward(dconv.reshape(f, 4 * m), col, w, dw, db, dx is not None, ws)
            if dcol is not None:
                cpu_kernels.col2im(dcol, dx, kh, kw, pad, hq, wq, run)
            return
        dyq = cached_buffer(ws, "dyq", (f, n, hh, wq), dy.dtype, xp, zero=True)
        dyq[:, :, :, :wh] = dy                              # junk columns keep a zero gradient
        dy2 = dyq.reshape(f, m)
        hit = cached_buffer(ws, "hit", (f, m), numpy.bool_, xp)
        if relu_out is not None:                            # the fused ReLU's mask: no gradient where max <= 0
            xp.greater(relu_out, 0, out=hit)
            dy2 *= hit
        dconv = cached_buffer(ws, "dconv", (f, 4, m), dy.dtype, xp)
        for t in range(4):
            xp.equal(arg, t, out=hit)
            xp.multiply(dy2, hit, out=dconv[:, t])
        dcol = self.conv_gemm_backward(dconv.reshape(f, 4 * m), col, w, dw, db, dx is not None, ws)
        if dcol is None:
            return
        dcol8 = dcol.reshape(c, kh, kw, 2, 2, n, run)
        dplanes = cached_buffer(ws, "dplanes", (2, 2, c, n, hq, wq), dy.dtype, xp)
        dplanes.fill(0)
        dflat = dplanes.reshape(2, 2, c, n, hq * wq)
        for column, plane in _plane_windows(kh, kw, wq, run):
            dflat[plane] += dcol8[column]
        for r in (0, 1):
            for s in (0, 1):
                src, dst = self._parity_slices(xshape, pad, r, s)
                dx[src] = dplanes[r, s][dst]
