"""The Model contract: flat parameter/gradient views, whole-model gradients, determinism, evaluation, input checks."""
import numpy as np
import pytest

from asyncsgd.model import MODEL_NAMES, Network, build_model

SMALL_SHAPES = {"speech_cnn": (1, 17, 19), "mnist_cnn": (1, 9, 12), "logreg": (2, 3, 4)}   # odd: pooling drops edges


def batch(net, n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n,) + net.input_shape).astype(net.dtype)
    y = rng.integers(0, net.n_classes, n)
    return x, y


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_whole_model_gradient_finite_differences(name):
    """Directional derivatives along random directions and single coordinates match dL/dparams (dropout fixed)."""
    net = build_model(name, SMALL_SHAPES[name], n_classes=4, seed=3, dtype=np.float64)
    x, y = batch(net, 3)

    def loss(rng_seed=5):
        return net.loss_and_grad(x, y, rng=np.random.default_rng(rng_seed))

    loss()
    g = net.grads.copy()
    p0 = net.params.copy()
    rng = np.random.default_rng(1)
    eps = 1e-6
    directions = [rng.standard_normal(net.n_params) for _ in range(2)]
    for i in rng.choice(net.n_params, 8, replace=False):
        e = np.zeros(net.n_params)
        e[i] = 1.0
        directions.append(e)
    # one coordinate of every parameter array, so each layer's gradient is checked on its own
    for _, off, _ in net.param_layout():
        e = np.zeros(net.n_params)
        e[off] = 1.0
        directions.append(e)
    for v in directions:
        net.params[:] = p0 + eps * v
        fp = loss()
        net.params[:] = p0 - eps * v
        fm = loss()
        num, ana = (fp - fm) / (2 * eps), g @ v
        assert abs(num - ana) <= 1e-6 * max(abs(num), abs(ana), 1e-3), (num, ana)
    net.params[:] = p0


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_params_and_grads_are_views(name):
    net = build_model(name, SMALL_SHAPES[name], n_classes=5, seed=0)
    assert net.params.ndim == 1 and net.params.flags.c_contiguous and net.params.dtype == np.float32
    assert net.grads.shape == net.params.shape == (net.n_params,)
    for layer in net.layers:
        for arr in layer.params.values():
            assert np.shares_memory(arr, net.params)
        for arr in layer.grads.values():
            assert np.shares_memory(arr, net.grads)
    x, y = batch(net, 4)
    before = net.forward(x)
    assert before.shape == (4, 5)
    last_bias_off = net.param_layout()[-1][1]
    net.params[last_bias_off] += 1.0               # the last layer's first bias entry shifts logit 0
    after = net.forward(x)
    np.testing.assert_allclose(after[:, 0] - before[:, 0], 1.0, rtol=1e-5)
    np.testing.assert_allclose(after[:, 1:], before[:, 1:])
    net.params[:] = 0.0                            # zero weights: uniform logits
    np.testing.assert_array_equal(net.forward(x), 0.0)
    net.grads[:] = np.nan
    net.loss_and_grad(x, y)
    assert np.isfinite(net.grads).all() and np.abs(net.grads).sum() > 0


def test_param_layout_tiles_the_vector():
    net = build_model("speech_cnn")
    layout = net.param_layout()
    assert [name for name, _, _ in layout] == ["conv1.w", "conv1.b", "conv2.w", "conv2.b", "dense1.w", "dense1.b",
                                               "dense2.w", "dense2.b"]
    assert layout[0] == ("conv1.w", 0, (16, 1, 5, 5))
    end = 0
    for _, off, shape in layout:
        assert off == end
        end += int(np.prod(shape))
    assert end == net.n_params == 661834
    assert net.n_params < 1_000_000


def test_seed_determinism():
    a = build_model("mnist_cnn", seed=7)
    b = build_model("mnist_cnn", seed=7)
    c = build_model("mnist_cnn", seed=8)
    np.testing.assert_array_equal(a.params, b.params)
    assert not np.array_equal(a.params, c.params)
    d = build_model("mnist_cnn", seed=7, dtype=np.float64)
    np.testing.assert_allclose(d.params, a.params, rtol=1e-6)
    x, y = batch(a, 8)
    assert a.loss_and_grad(x, y, rng=np.random.default_rng(1)) == b.loss_and_grad(x, y, rng=np.random.default_rng(1))
    np.testing.assert_array_equal(a.grads, b.grads)
    # conv1 weights follow He init: std sqrt(2 / 25)
    w = a.params[:16 * 25]
    assert abs(w.std() - np.sqrt(2 / 25)) < 0.05


def test_loss_and_grad_overwrites_grads():
    net = build_model("speech_cnn", (1, 16, 16), seed=1)
    x, y = batch(net, 6)
    net.loss_and_grad(x, y, rng=np.random.default_rng(2))
    first = net.grads.copy()
    net.grads += 123.0
    net.loss_and_grad(x, y, rng=np.random.default_rng(2))
    np.testing.assert_allclose(net.grads, first, rtol=1e-6, atol=1e-7)


def test_dropout_only_in_training():
    net = build_model("speech_cnn", (1, 16, 16), seed=1)
    x, y = batch(net, 6)
    np.testing.assert_array_equal(net.forward(x), net.forward(x))
    t1 = net.forward(x, train=True, rng=np.random.default_rng(1))
    t2 = net.forward(x, train=True, rng=np.random.default_rng(2))
    assert not np.array_equal(t1, t2)
    assert net.loss(x, y) == pytest.approx(net.evaluate(x, y)[0], rel=1e-5)


def test_evaluate_batches_agree():
    net = build_model("logreg", (1, 6, 5), n_classes=3, seed=0, dtype=np.float64)
    x, y = batch(net, 50)
    loss_all, acc_all = net.evaluate(x, y, batch_size=64)
    loss_bat, acc_bat = net.evaluate(x, y, batch_size=7)
    assert loss_all == pytest.approx(loss_bat, rel=1e-12)
    assert acc_all == acc_bat
    logits = net.forward(x)
    assert acc_all == pytest.approx(np.mean(logits.argmax(axis=1) == y))
    assert loss_all == pytest.approx(net.loss(x, y), rel=1e-12)


def test_sgd_learns_a_separable_problem():
    """A few SGD steps on the speech CNN drive the training loss on a learnable batch down."""
    net = build_model("speech_cnn", (1, 16, 16), n_classes=2, seed=0)
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 16)
    x = rng.standard_normal((16, 1, 16, 16)).astype(np.float32) * 0.1
    x[y == 1, :, :8] += 1.0
    first = net.loss_and_grad(x, y)
    for _ in range(15):
        net.loss_and_grad(x, y)
        net.params -= 0.05 * net.grads
    assert net.loss(x, y) < 0.3 * first
    assert net.evaluate(x, y)[1] == 1.0


def test_bad_inputs_raise_value_error():
    with pytest.raises(ValueError, match="unknown model"):
        build_model("resnet")
    with pytest.raises(ValueError, match="at least 4x4"):
        build_model("speech_cnn", (1, 40, 3))
    net = build_model("speech_cnn", (1, 40, 16))
    with pytest.raises(ValueError, match="expects input of shape"):
        net.forward(np.zeros((2, 1, 40, 17), np.float32))
    with pytest.raises(ValueError, match="labels"):
        net.loss_and_grad(np.zeros((2, 1, 40, 16), np.float32), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="dtype"):
        build_model("logreg", dtype=np.int32)


def test_speech_cnn_accepts_any_frame_and_band_count():
    for bands, t in ((40, 16), (40, 37), (40, 64), (40, 101), (13, 50), (64, 4), (4, 9), (80, 32)):
        net = build_model("speech_cnn", (1, bands, t))
        x, y = batch(net, 2)
        assert net.forward(x).shape == (2, 10)
        assert np.isfinite(net.loss_and_grad(x, y))
    assert isinstance(net, Network)
