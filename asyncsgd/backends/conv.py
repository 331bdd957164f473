"""Convolution primitives of ``NumpyOps`` (``ConvOps``): im2col / col2im and the one convolution GEMM.

Every convolution of every backend goes through one GEMM helper, ``conv_columns`` + ``conv_gemm_forward`` /
``conv_gemm_backward`` (the bias folded in as a row of ones): the unfused ``conv2d_*`` here, the fused conv + max pool
(``asyncsgd.backends.conv_pool``) and ``CupyOps``' kernels.  Image activations are channel-major ``(C, N, H, W)``, so
a convolution is one row-major GEMM ``W[F, C*kh*kw] @ col[C*kh*kw, N*Ho*Wo]`` whose result is already the next
layer's ``(F, N, Ho, Wo)`` input.  Written against ``self.xp``: the methods run on CuPy arrays too.
"""
from __future__ import annotations

from asyncsgd.backends.workspace import cached_buffer, conv_output_size, pair

__all__ = ["ConvOps"]


class ConvOps:
    """The convolution methods of ``NumpyOps`` (a mixin: it needs ``self.xp``)."""

    def conv2d_forward(self, x, w, b, stride, pad, ws=None):
        """Return ``(y, cache)`` of a 2-D cross-correlation (PyTorch's Conv2d) with zero padding.

        x: (C, N, H, W); w: (F, C, kh, kw); b: (F,); ``stride`` and ``pad`` an int or an (h, w) pair;
        y: (F, N, Ho, Wo) with ``Ho = (H + 2*pad_h - kh)//stride_h + 1`` (likewise Wo) and
        ``y[f, n, i, j] = b[f] + sum_{c,p,q} w[f, c, p, q] * xpad[c, n, i*stride_h + p, j*stride_w + q]``.
        ``cache`` is opaque; pass it unchanged to ``conv2d_backward``.

        Implementation: x is copied into a zero-bordered buffer, the kh*kw shifted windows are copied with one
        strided copy into the columns of ``conv_columns``, and ``conv_gemm_forward`` gives y.
        """
        xp = self.xp
        ws = {} if ws is None else ws
        (sh, sw), (ph, pw) = pair(stride, "stride"), pair(pad, "pad")
        c, n, h, wd = x.shape
        ho, wo = self._conv_shape(x.shape, w.shape, (sh, sw), (ph, pw))
        f, _, kh, kw = w.shape
        if ph or pw:
            xpad = cached_buffer(ws, "xpad", (c, n, h + 2 * ph, wd + 2 * pw), x.dtype, xp, zero=True)
            xpad[:, :, ph:ph + h, pw:pw + wd] = x   # the border stays zero from allocation
        else:
            xpad = x
        k = c * kh * kw
        col = self.conv_columns(ws, k, n * ho * wo, x.dtype)
        self.im2col(xpad, kh, kw, (sh, sw), ho, wo, out=col[:k].reshape(c, kh, kw, n, ho, wo))
        y = self.conv_gemm_forward(w, b, col, ws)
        cache = (x.shape, (sh, sw), (ph, pw), ho, wo, col, xpad.shape)
        return y.reshape(f, n, ho, wo), cache

    @staticmethod
    def _conv_shape(xshape, wshape, stride, pad):
        """Return (Ho, Wo) of a convolution; ValueError when channels differ or the kernel does not fit."""
        c, _, h, wd = xshape
        _, c2, kh, kw = wshape
        if c2 != c:
            raise ValueError(f"conv2d: input has {c} channels but the weights expect {c2}")
        ho, wo = conv_output_size(h, kh, stride[0], pad[0]), conv_output_size(wd, kw, stride[1], pad[1])
        if ho < 1 or wo < 1:
            raise ValueError(f"conv2d: input {h}x{wd} is smaller than the {kh}x{kw} kernel (pad {pad[0]}x{pad[1]})")
        return ho, wo

    def im2col(self, xpad, kh: int, kw: int, stride, ho: int, wo: int, out):
        """Copy windows of padded ``xpad`` (C, N, Hp, Wp) into ``out`` (C, kh, kw, N, Ho, Wo):

        ``out[c, p, q, n, i, j] = xpad[c, n, i*stride_h + p, j*stride_w + q]``; ``stride`` an int or (h, w) pair.
        """
        (sh, sw) = pair(stride, "stride")
        s_c, s_n, s_h, s_w = xpad.strides
        view = self.xp.lib.stride_tricks.as_strided(
            xpad, shape=out.shape, strides=(s_c, s_h, s_w, s_n, s_h * sh, s_w * sw))
        self.xp.copyto(out, view)
        return out

    def col2im_add(self, dcol, stride, out):
        """Add ``dcol`` (C, kh, kw, N, Ho, Wo) into ``out`` (C, N, Hp, Wp): the adjoint of ``im2col``.

        ``out[c, n, i*stride_h + p, j*stride_w + q] += dcol[c, p, q, n, i, j]``; one strided add per kernel offset.
        """
        (sh, sw) = pair(stride, "stride")
        _, kh, kw, _, ho, wo = dcol.shape
        for p in range(kh):
            for q in range(kw):
                dst = out[:, :, p:p + sh * (ho - 1) + 1:sh, q:q + sw * (wo - 1) + 1:sw]
                dst += dcol[:, p, q]
        return out

    def conv2d_backward(self, dy, cache, w, dw, db, need_dx: bool = True, ws=None):
        """Write the weight gradients of ``conv2d_forward`` into ``dw``/``db`` and return dx (or None).

        dy: (F, N, Ho, Wo) gradient of the loss w.r.t. y; w: (F, C, kh, kw) the forward weights;
        dw: (F, C, kh, kw) and db: (F,) arrays that are OVERWRITTEN with dL/dw and dL/db;
        returns dx: (C, N, H, W) (possibly a non-contiguous view into ``ws``), or None when ``need_dx`` is False
        (the network's first layer), which skips the input-gradient GEMM.
        """
        xp = self.xp
        ws = {} if ws is None else ws
        xshape, stride, (ph, pw), ho, wo, col, pshape = cache
        c, n, h, wd = xshape
        f, _, kh, kw = w.shape
        dcol = self.conv_gemm_backward(dy.reshape(f, n * ho * wo), col, w, dw, db, need_dx, ws)
        if dcol is None:
            return None
        dxpad = cached_buffer(ws, "dxpad", pshape, dy.dtype, xp)
        dxpad.fill(0)
        self.col2im_add(dcol.reshape(c, kh, kw, n, ho, wo), stride, dxpad)
        if ph or pw:
            return dxpad[:, :, ph:ph + h, pw:pw + wd]
        return dxpad

    # ---- the convolution GEMM, shared by every convolution of every backend ---------------------------------------
    def conv_columns(self, ws, k: int, p: int, dtype):
        """Return the cached column matrix (K + 1, P) of a convolution whose last row is ones (the bias row).

        Rows 0..K-1 are the caller's to fill (im2col); the ones row is written once per buffer.
        """
        col = ws.get("col")
        if col is None or col.shape != (k + 1, p) or col.dtype != dtype:
            col = self.xp.empty((k + 1, p), dtype)
            col[k] = 1
            ws["col"] = col
        return col

    def conv_gemm_forward(self, w, b, col, ws):
        """Return ``[w | b] @ col`` (F, P) for w (F, C, kh, kw), b (F,) and ``col`` from ``conv_columns``.

        The ones row of ``col`` folds the bias into the GEMM, saving a pass over y; y lives in ``ws``.
        """
        xp = self.xp
        f, k = w.shape[0], col.shape[0] - 1
        wb = cached_buffer(ws, "wb", (f, k + 1), w.dtype, xp)
        wb[:, :k] = w.reshape(f, k)
        wb[:, k] = b
        y = cached_buffer(ws, "y", (f, col.shape[1]), col.dtype, xp)
        xp.matmul(wb, col, out=y)
        return y

    def conv_gemm_backward(self, dy2, col, w, dw, db, need_dx: bool, ws):
        """The two GEMMs of a convolution's backward pass.

        dy2: (F, P) output gradient; col: (K + 1, P) the forward's columns with their ones row, K = C*kh*kw.
        Overwrites dw (F, C, kh, kw) and db (F,) from one GEMM ``dy2 @ col.T`` (the ones row yields db);
        returns dcol = w^T dy2, (K, P), for col2im, or None when ``need_dx`` is False.
        """
        xp = self.xp
        f, k, p = w.shape[0], col.shape[0] - 1, dy2.shape[1]
        # (dy2 @ col.T).T computed as col @ dy2.T: the same products and sums, and 17-30% faster with OpenBLAS for
        # these long, thin GEMMs (measured on the speech_cnn convolutions, one thread).
        dwbt = cached_buffer(ws, "dwbt", (k + 1, f), dy2.dtype, xp)
        xp.matmul(col, dy2.T, out=dwbt)
        dw[...] = dwbt[:k].T.reshape(dw.shape)
        db[...] = dwbt[k]
        if not need_dx:
            return None
        dcol = cached_buffer(ws, "dcol", (k, p), dy2.dtype, xp)
        xp.matmul(w.reshape(f, k).T, dy2, out=dcol)
        return dcol
