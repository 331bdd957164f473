"""Each layer's backward pass against central finite differences in float64, and the forward passes against direct
loops.  (benchmarks/bench_conv.py checks the whole speech_cnn against PyTorch before timing it.)"""
import numpy as np
import pytest

from asyncsgd.model import (AvgPool2D, Conv2D, Dense, Dropout, Flatten, MaxPool2D, NumpyOps, ReLU, Sigmoid, Tanh,
                            layer_from_spec)

OPS = NumpyOps()
EPS = 1e-6
TOL = 1e-6


def rel_error(a, b):
    """Return ||a - b|| / max(||a||, ||b||): the relative error of two gradient arrays."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    scale = max(np.linalg.norm(a), np.linalg.norm(b), 1e-300)
    return np.linalg.norm(a - b) / scale


def bind(layer, in_shape, rng):
    """Give ``layer`` float64 parameters/gradients of its specs (random, biases too) and return the param dict."""
    params, grads = {}, {}
    for suffix, shape, _ in layer.param_specs(in_shape):
        params[suffix] = rng.standard_normal(shape)
        grads[suffix] = np.full(shape, np.nan)          # NaN: backward must overwrite every entry
    layer.bind(OPS, params, grads)
    return params


def numeric_grad(f, a):
    """Central-difference gradient of scalar f() w.r.t. every entry of array ``a`` (perturbed in place)."""
    g = np.zeros_like(a)
    flat, gflat = a.reshape(-1), g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + EPS
        fp = f()
        flat[i] = old - EPS
        fm = f()
        flat[i] = old
        gflat[i] = (fp - fm) / (2 * EPS)
    return g


def check_layer(layer, x, in_shape, seed=0, make_rng=None):
    """Check dL/dx and dL/dparams of ``layer`` for L = sum(forward(x) * r) with a random r."""
    rng = np.random.default_rng(seed)
    params = bind(layer, in_shape, rng)
    make_rng = make_rng or (lambda: None)
    y = layer.forward(x, True, make_rng())
    r = rng.standard_normal(y.shape)

    def loss():
        return float(np.sum(layer.forward(x, True, make_rng()) * r))

    layer.forward(x, True, make_rng())
    dx = np.array(layer.backward(r.copy(), need_dx=True))
    grads = {k: v.copy() for k, v in layer.grads.items()}
    assert dx.shape == x.shape
    assert rel_error(dx, numeric_grad(loss, x)) < TOL
    for name, p in params.items():
        assert not np.isnan(grads[name]).any(), f"{name} gradient not fully written"
        err = rel_error(grads[name], numeric_grad(loss, p))
        assert err < TOL, f"{layer!r} {name}: relative error {err:.2e}"


def cnhw(rng, c, n, h, w):
    return rng.standard_normal((c, n, h, w))


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def direct_conv(x, w, b, stride, pad):
    """Reference convolution by loops over output positions: x (C, N, H, W), w (F, C, kh, kw) -> (F, N, Ho, Wo)."""
    (sh, sw), (ph, pw) = _pair(stride), _pair(pad)
    c, n, h, wd = x.shape
    f, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    ho, wo = (h + 2 * ph - kh) // sh + 1, (wd + 2 * pw - kw) // sw + 1
    y = np.zeros((f, n, ho, wo))
    for i in range(ho):
        for j in range(wo):
            patch = xp[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw]   # (C, N, kh, kw)
            y[:, :, i, j] = np.einsum("cnpq,fcpq->fn", patch, w) + b[:, None]
    return y


CONV_CASES = [  # (C, N, H, W, F, kernel, stride, pad)
    (2, 2, 6, 5, 3, 3, 1, 1),
    (3, 2, 7, 6, 4, 3, 2, 0),
    (1, 3, 5, 7, 2, 5, 1, 2),
    (2, 1, 9, 8, 3, (2, 3), 3, 1),
    (3, 2, 4, 4, 2, 1, 1, 0),
    (2, 2, 5, 5, 2, 4, 2, 2),
    (1, 2, 13, 9, 3, (5, 3), (1, 2), (2, 1)),      # rectangular kernel, stride and padding
    (2, 1, 8, 10, 2, (1, 4), (2, 1), (0, 2)),
]


@pytest.mark.parametrize("c,n,h,w,f,kernel,stride,pad", CONV_CASES)
def test_conv_forward_matches_direct_loops(c, n, h, w, f, kernel, stride, pad):
    rng = np.random.default_rng(1)
    layer = Conv2D(f, kernel, stride=stride, pad=pad)
    params = bind(layer, (c, h, w), rng)
    x = cnhw(rng, c, n, h, w)
    y = layer.forward(x, False, None)
    assert y.shape == (f, n) + layer.output_shape((c, h, w))[1:]
    np.testing.assert_allclose(y, direct_conv(x, params["w"], params["b"], stride, pad), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("c,n,h,w,f,kernel,stride,pad", CONV_CASES)
def test_conv_backward_finite_differences(c, n, h, w, f, kernel, stride, pad):
    rng = np.random.default_rng(2)
    check_layer(Conv2D(f, kernel, stride=stride, pad=pad), cnhw(rng, c, n, h, w), (c, h, w))


def test_conv_first_layer_skips_input_gradient():
    rng = np.random.default_rng(3)
    layer = Conv2D(2, 3, pad=1)
    bind(layer, (1, 5, 5), rng)
    y = layer.forward(cnhw(rng, 1, 2, 5, 5), True, None)
    assert layer.backward(np.ones_like(y), need_dx=False) is None
    assert np.isfinite(layer.grads["w"]).all() and layer.grads["b"][0] == pytest.approx(y[0].size)


def test_conv_rejects_wrong_channels_and_tiny_inputs():
    layer = Conv2D(2, 3)
    with pytest.raises(ValueError, match="smaller than"):
        layer.output_shape((1, 2, 2))
    with pytest.raises(ValueError, match="channels"):
        OPS.conv2d_forward(np.zeros((2, 1, 5, 5)), np.zeros((2, 3, 3, 3)), np.zeros(2), 1, 0)


@pytest.mark.parametrize("h,w,size,stride", [(6, 8, 2, 2), (5, 7, 2, 2), (7, 7, 3, 2), (8, 7, 2, 3), (6, 6, 3, 3)])
def test_maxpool_forward_and_finite_differences(h, w, size, stride):
    rng = np.random.default_rng(4)
    x = cnhw(rng, 2, 3, h, w)
    layer = MaxPool2D(size, stride)
    layer.bind(OPS, {}, {})
    y = layer.forward(x, False, None)
    ho, wo = layer.output_shape((2, h, w))[1:]
    ref = np.array([[x[:, :, i * stride:i * stride + size, j * stride:j * stride + size].max(axis=(2, 3))
                     for j in range(wo)] for i in range(ho)])                       # (Ho, Wo, C, N)
    np.testing.assert_array_equal(y, ref.transpose(2, 3, 0, 1))
    check_layer(MaxPool2D(size, stride), x, (2, h, w))


def test_maxpool_ties_route_gradient_once():
    layer = MaxPool2D(2)
    layer.bind(OPS, {}, {})
    x = np.zeros((1, 1, 2, 4))
    layer.forward(x, True, None)
    dx = layer.backward(np.array([[[[1.0, 2.0]]]]))
    np.testing.assert_array_equal(dx, [[[[1.0, 0.0, 2.0, 0.0], [0.0, 0.0, 0.0, 0.0]]]])


def test_relu_finite_differences():
    rng = np.random.default_rng(5)
    x = cnhw(rng, 2, 3, 4, 5)
    x[np.abs(x) < 1e-3] = 0.5       # keep finite differences away from the kink
    check_layer(ReLU(), x, (2, 4, 5))
    check_layer(ReLU(), rng.standard_normal((4, 7)) + 0.01, (7,))


def test_dense_finite_differences():
    rng = np.random.default_rng(6)
    check_layer(Dense(5), rng.standard_normal((4, 7)), (7,))


def test_flatten_order_and_finite_differences():
    rng = np.random.default_rng(7)
    x = cnhw(rng, 3, 2, 4, 5)
    layer = Flatten()
    layer.bind(OPS, {}, {})
    np.testing.assert_array_equal(layer.forward(x, False, None), x.transpose(1, 0, 2, 3).reshape(2, 60))
    check_layer(Flatten(), x, (3, 4, 5))


def test_dropout_fixed_rng_finite_differences_and_eval_identity():
    rng = np.random.default_rng(8)
    x = rng.standard_normal((6, 9))
    check_layer(Dropout(0.4), x, (9,), make_rng=lambda: np.random.default_rng(11))
    layer = Dropout(0.4)
    layer.bind(OPS, {}, {})
    assert layer.forward(x, False, None) is x
    y = layer.forward(x, True, np.random.default_rng(0))
    kept = y != 0
    np.testing.assert_allclose(y[kept], x[kept] / 0.6)
    assert 0 < kept.sum() < x.size
    with pytest.raises(ValueError):
        Dropout(1.0)


def test_softmax_cross_entropy_finite_differences():
    rng = np.random.default_rng(9)
    logits = rng.standard_normal((5, 4)) * 3
    y = rng.integers(0, 4, 5)
    loss, d = OPS.softmax_cross_entropy(logits, y)
    p = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    assert float(loss) == pytest.approx(-np.log(p[np.arange(5), y]).mean(), rel=1e-12)
    num = numeric_grad(lambda: float(OPS.softmax_cross_entropy(logits, y, need_grad=False)[0]), logits)
    assert rel_error(d, num) < TOL
    lsum, hits = OPS.sum_loss_and_correct(logits, y)
    assert float(lsum) == pytest.approx(5 * float(loss))
    assert int(hits) == int((logits.argmax(axis=1) == y).sum())


def test_float32_conv_matches_float64():
    rng = np.random.default_rng(10)
    x = cnhw(rng, 3, 4, 9, 11)
    w, b = rng.standard_normal((5, 3, 3, 3)), rng.standard_normal(5)
    y64, _ = OPS.conv2d_forward(x, w, b, 1, 1)
    y32, _ = OPS.conv2d_forward(x.astype(np.float32), w.astype(np.float32), b.astype(np.float32), 1, 1)
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, y64, rtol=1e-4, atol=1e-4)


FUSED_CASES = [  # (C, N, H, W, F, kernel, pad)
    (1, 2, 8, 8, 3, 5, 2),
    (2, 3, 7, 9, 4, 3, 1),
    (3, 1, 6, 5, 2, 3, 0),
    (2, 2, 5, 6, 3, (2, 3), 1),
    (1, 2, 4, 4, 2, 1, 0),
    (2, 1, 9, 7, 2, 4, 2),
    (2, 2, 9, 8, 3, (5, 3), (2, 1)),               # rectangular kernel and padding
]


@pytest.mark.parametrize("c,n,h,w,f,kernel,pad", FUSED_CASES)
def test_fused_conv_pool_equals_conv_then_pool(c, n, h, w, f, kernel, pad):
    """conv2d_maxpool_* give the values and gradients of conv2d_* followed by maxpool_* (odd sizes, any pad)."""
    rng = np.random.default_rng(13)
    x = cnhw(rng, c, n, h, w)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    wt, b = rng.standard_normal((f, c, kh, kw)), rng.standard_normal(f)
    yc, cc = OPS.conv2d_forward(x, wt, b, 1, pad)
    yp, cp = OPS.maxpool_forward(yc, 2, 2)
    yf, cf = OPS.conv2d_maxpool_forward(x, wt, b, pad, ws={})
    np.testing.assert_allclose(yf, yp, rtol=1e-12, atol=1e-12)
    dy = rng.standard_normal(yp.shape)
    dw1, db1, dw2, db2 = (np.empty_like(a) for a in (wt, b, wt, b))
    dx1 = OPS.conv2d_backward(np.ascontiguousarray(OPS.maxpool_backward(dy, cp)), cc, wt, dw1, db1)
    dx2 = OPS.conv2d_maxpool_backward(dy, cf, wt, dw2, db2, ws={})
    np.testing.assert_allclose(dw2, dw1, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(db2, db1, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx2, dx1, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("c,n,h,w,f,kernel,pad", FUSED_CASES[:3])
def test_fused_conv_pool_finite_differences(c, n, h, w, f, kernel, pad):
    rng = np.random.default_rng(14)
    conv, pool = Conv2D(f, kernel, pad=pad), MaxPool2D(2)
    pool.bind(OPS, {}, {})
    bind(conv, (c, h, w), rng)
    assert conv.fuse_pool(pool) and pool.forward("unchanged", True, None) == "unchanged"
    check_layer(conv, cnhw(rng, c, n, h, w), (c, h, w), seed=15)


def test_fused_pool_ties_pick_first_maximum():
    """Constant inputs make every window a four-way tie: the gradient goes to the window's first element only."""
    x = np.ones((1, 1, 4, 4))
    wt, b = np.ones((1, 1, 1, 1)), np.zeros(1)
    y, cache = OPS.conv2d_maxpool_forward(x, wt, b, 0, ws={})
    dw, db = np.empty_like(wt), np.empty_like(b)
    dx = OPS.conv2d_maxpool_backward(np.ones_like(y), cache, wt, dw, db, ws={})
    expect = np.zeros((4, 4))
    expect[::2, ::2] = 1
    np.testing.assert_array_equal(dx[0, 0], expect)
    assert dw.item() == 4 and db.item() == 4


def test_fusion_only_for_unmodified_ops():
    class KernelOps(NumpyOps):
        def conv2d_forward(self, x, w, b, stride, pad, ws=None):
            return super().conv2d_forward(x, w, b, stride, pad, ws)

    class FusedKernelOps(KernelOps):
        def conv2d_maxpool_forward(self, x, w, b, pad, ws=None):
            return super().conv2d_maxpool_forward(x, w, b, pad, ws)

    assert NumpyOps().fuses_conv_pool
    assert not KernelOps().fuses_conv_pool
    assert FusedKernelOps().fuses_conv_pool


@pytest.mark.parametrize("c,n,h,w,f,kernel,pad", FUSED_CASES + [(3, 7, 9, 8, 4, 3, 1)])
@pytest.mark.parametrize("relu", [False, True])
def test_fused_conv_pool_batch_parts_equal_one_thread(c, n, h, w, f, kernel, pad, relu):
    """With threads > 1 the batch runs in parts (uneven ones, more threads than rows too): same values, dx and
    weight gradients (summed over the parts) as one thread; ``relu=True`` equals relu_* after the fused pair."""
    rng = np.random.default_rng(21)
    x = cnhw(rng, c, n, h, w)
    kh, kw = (kernel, kernel) if isinstance(kernel, int) else kernel
    wt, b = rng.standard_normal((f, c, kh, kw)), rng.standard_normal(f)
    one = NumpyOps(threads=1)
    y1, c1 = one.conv2d_maxpool_forward(x, wt, b, pad, ws={})
    dy = rng.standard_normal(y1.shape)
    if relu:
        r = one.relu_forward(y1)
        y1, dy1 = r, one.relu_backward(dy, r)
    else:
        dy1 = dy
    dw1, db1 = np.empty_like(wt), np.empty_like(b)
    dx1 = one.conv2d_maxpool_backward(dy1, c1, wt, dw1, db1, ws={})
    for threads in (2, 3, n + 1):
        ops = NumpyOps(threads=threads)
        assert ops.threads == threads
        ws = {}
        for _ in range(2):                              # the second call reuses every buffer
            y, cache = ops.conv2d_maxpool_forward(x, wt, b, pad, ws=ws, relu=relu)
            dw, db = np.full_like(wt, np.nan), np.full_like(b, np.nan)
            dx = ops.conv2d_maxpool_backward(dy, cache, wt, dw, db, ws=ws)
            np.testing.assert_allclose(y, y1, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(dx, dx1, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(dw, dw1, rtol=1e-12, atol=1e-12)
            np.testing.assert_allclose(db, db1, rtol=1e-12, atol=1e-12)
        assert ops.conv2d_maxpool_backward(dy, cache, wt, dw, db, need_dx=False, ws=ws) is None
        np.testing.assert_allclose(dw, dw1, rtol=1e-12, atol=1e-12)


def test_network_fuses_conv_pool_relu_and_threads_keep_results():
    """speech_cnn fuses conv -> pool -> ReLU; loss and gradients equal the unfused network at 1 and 3 threads."""
    from asyncsgd.model import Network, speech_cnn
    rng = np.random.default_rng(22)
    x = rng.standard_normal((11, 1, 12, 16)).astype(np.float32)
    y = rng.integers(0, 10, 11)
    plain = speech_cnn((1, 12, 16), 10, ops=NumpyOps(threads=1), seed=4, dtype=np.float64)
    plain = Network.from_spec("plain", plain.spec(), (1, 12, 16), 10, ops=NumpyOps(threads=1), dtype=np.float64,
                              seed=4, fuse=False)
    want = plain.loss_and_grad(x, y, rng=np.random.default_rng(5))
    for threads in (1, 3):
        net = speech_cnn((1, 12, 16), 10, ops=NumpyOps(threads=threads), seed=4, dtype=np.float64)
        fused = [layer.kind for layer in net.layers if getattr(layer, "fused", False)]
        assert fused == ["pool", "relu", "pool", "relu"]
        assert net.loss_and_grad(x, y, rng=np.random.default_rng(5)) == pytest.approx(want, rel=1e-12)
        np.testing.assert_allclose(net.grads, plain.grads, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(net.forward(x), plain.forward(x), rtol=1e-10, atol=1e-12)


def test_relu_fusion_only_with_numpy_fused_pair():
    """A subclass that overrides the fused pair (its own kernels, no ``relu``) keeps its ReLU layers unfused."""
    class FusedKernelOps(NumpyOps):
        def conv2d_maxpool_forward(self, x, w, b, pad, ws=None):
            return super().conv2d_maxpool_forward(x, w, b, pad, ws)

    assert NumpyOps().fuses_conv_pool_relu and not FusedKernelOps().fuses_conv_pool_relu
    from asyncsgd.model import speech_cnn
    net = speech_cnn((1, 8, 8), 10, ops=FusedKernelOps(threads=1))
    assert [layer.kind for layer in net.layers if getattr(layer, "fused", False)] == ["pool", "pool"]


# ---- rectangular windows, average pooling, tanh and sigmoid --------------------------------------------------------

def window_reference(x, size, stride, reduce):
    """Pool (C, N, H, W) by loops over output positions with ``reduce`` over axes (2, 3)."""
    (kh, kw), (sh, sw) = _pair(size), _pair(stride)
    ho, wo = (x.shape[2] - kh) // sh + 1, (x.shape[3] - kw) // sw + 1
    out = np.array([[reduce(x[:, :, i * sh:i * sh + kh, j * sw:j * sw + kw], axis=(2, 3)) for j in range(wo)]
                    for i in range(ho)])
    return out.transpose(2, 3, 0, 1)


POOL_CASES = [  # (H, W, size, stride): pooling over frequency only, overlapping in one axis, gaps in the other
    (8, 5, (2, 1), None), (7, 9, (3, 2), (1, 3)), (6, 7, (1, 3), (2, 2)), (5, 7, 2, 2), (7, 7, 3, 2)]


@pytest.mark.parametrize("h,w,size,stride", POOL_CASES)
def test_rectangular_maxpool_forward_and_finite_differences(h, w, size, stride):
    rng = np.random.default_rng(20)
    x = cnhw(rng, 2, 3, h, w)
    layer = MaxPool2D(size, stride)
    layer.bind(OPS, {}, {})
    np.testing.assert_array_equal(layer.forward(x, False, None),
                                  window_reference(x, size, stride or size, np.max))
    assert layer.output_shape((2, h, w))[1:] == window_reference(x, size, stride or size, np.max).shape[2:]
    check_layer(MaxPool2D(size, stride), x, (2, h, w))


@pytest.mark.parametrize("h,w,size,stride", POOL_CASES + [(6, 6, 2, 1), (9, 8, 4, 3)])
def test_avgpool_forward_and_finite_differences(h, w, size, stride):
    rng = np.random.default_rng(21)
    x = cnhw(rng, 2, 3, h, w)
    layer = AvgPool2D(size, stride)
    layer.bind(OPS, {}, {})
    np.testing.assert_allclose(layer.forward(x, False, None), window_reference(x, size, stride or size, np.mean),
                               rtol=1e-12, atol=1e-12)
    check_layer(AvgPool2D(size, stride), x, (2, h, w))


@pytest.mark.parametrize("layer_cls", [Tanh, Sigmoid])
def test_tanh_and_sigmoid_forward_and_finite_differences(layer_cls):
    rng = np.random.default_rng(22)
    x = cnhw(rng, 2, 3, 4, 5) * 3
    x[0, 0, 0, :3] = [-40.0, 40.0, 0.0]            # saturated ends and the centre
    layer = layer_cls()
    layer.bind(OPS, {}, {})
    want = np.tanh(x) if layer_cls is Tanh else 1.0 / (1.0 + np.exp(-x))
    np.testing.assert_allclose(layer.forward(x, False, None), want, rtol=1e-12, atol=1e-15)
    check_layer(layer_cls(), x, (2, 4, 5))
    check_layer(layer_cls(), rng.standard_normal((4, 7)), (7,))


def test_new_layers_in_float32_match_float64():
    rng = np.random.default_rng(23)
    x = cnhw(rng, 2, 3, 8, 6)
    for make in (lambda: AvgPool2D((2, 3), (1, 2)), lambda: MaxPool2D((2, 1)), Tanh, Sigmoid):
        a, b = make(), make()
        a.bind(OPS, {}, {})
        b.bind(OPS, {}, {})
        y32 = a.forward(x.astype(np.float32), False, None)
        assert y32.dtype == np.float32
        np.testing.assert_allclose(y32, b.forward(x, False, None), rtol=1e-6, atol=1e-6)


def test_layer_arguments_are_checked():
    with pytest.raises(ValueError, match="kernel >= 1"):
        Conv2D(4, (3, 0))
    with pytest.raises(ValueError, match="pad >= 0"):
        Conv2D(4, 3, pad=(1, -1))
    with pytest.raises(TypeError, match=r"\(h, w\) pair"):
        MaxPool2D((2, 2, 2))
    with pytest.raises(ValueError, match="at most 256"):
        MaxPool2D((16, 17))
    with pytest.raises(ValueError, match="smaller than the 3x2 window"):
        AvgPool2D((3, 2)).output_shape((1, 2, 5))


@pytest.mark.parametrize("layer", [Conv2D(4, (5, 3), stride=(1, 2), pad=(2, 0)), MaxPool2D((2, 1)),
                                   AvgPool2D(3, (1, 2)), ReLU(), Tanh(), Sigmoid(), Flatten(), Dense(7),
                                   Dropout(0.3)], ids=repr)
def test_layer_spec_round_trips_through_json(layer):
    import json
    spec = json.loads(json.dumps(layer.spec()))
    again = layer_from_spec(spec)
    assert type(again) is type(layer) and again.spec() == layer.spec()


def test_layer_from_spec_rejects_unknown_types():
    with pytest.raises(ValueError, match="unknown layer type 'Mystery'.*register_layer"):
        layer_from_spec({"type": "Mystery"})
    with pytest.raises(ValueError, match="does not fit Dense"):
        layer_from_spec({"type": "Dense", "width": 3})
