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


# ---- factories, the registry, specs ----------------------------------------------------------------------------------

USER_MODULE = '''
from asyncsgd.model import AvgPool2D, Conv2D, Dense, Flatten, MaxPool2D, Network, Tanh

def freq_cnn(input_shape, n_classes, *, ops, seed=0):
    layers = [Conv2D(4, (5, 3), pad=(2, 1)), MaxPool2D((2, 1)), Tanh(), AvgPool2D((1, 2)), Flatten(),
              Dense(n_classes)]
    return Network("freq_cnn", layers, input_shape, n_classes, ops=ops, seed=seed)

not_a_factory = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module of the user's own, importable from the working directory only."""
    (tmp_path / "my_nets_for_test.py").write_text(USER_MODULE)
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "my_nets_for_test"
    import sys
    sys.modules.pop("my_nets_for_test", None)


def test_builtins_are_registered_factories():
    from asyncsgd.model import MODELS, NumpyOps, resolve_model, speech_cnn
    assert MODEL_NAMES == ("speech_cnn", "mnist_cnn", "logreg") and set(MODEL_NAMES) <= set(MODELS)
    name, factory = resolve_model("speech_cnn")
    assert (name, factory) == ("speech_cnn", speech_cnn)
    net = factory((1, 40, 64), 10, ops=NumpyOps(), seed=0)
    assert net.n_params == 661_834
    np.testing.assert_array_equal(net.params, build_model("speech_cnn", seed=0).params)


def test_resolve_model_imports_a_user_factory(user_module):
    from asyncsgd.model import resolve_model
    name, factory = resolve_model(f"{user_module}:freq_cnn")
    assert name == f"{user_module}:freq_cnn" and factory.__name__ == "freq_cnn"
    net = build_model(name, (1, 12, 8), 3, seed=4)
    assert net.factory == name and net.output_shape == (3,)
    x, y = batch(net, 2)
    assert np.isfinite(net.loss_and_grad(x, y))
    assert resolve_model(factory)[0] == f"{user_module}:freq_cnn"       # a callable is named by its import path
    net64 = build_model(name, (1, 12, 8), 3, seed=4, dtype=np.float64)  # no dtype argument: built, then cast
    assert net64.dtype == np.float64
    np.testing.assert_array_equal(net64.params, net.params.astype(np.float64))


@pytest.mark.parametrize("spec,message", [
    ("resnet", "unknown model 'resnet'.*PACKAGE.MODULE:FUNCTION"),
    ("no_such_module_xyz:net", "cannot import 'no_such_module_xyz'"),
    ("{mod}:missing", "has no attribute 'missing'"),
    ("{mod}:not_a_factory", "is not callable"),
    (":net", "PACKAGE.MODULE:FUNCTION"),
])
def test_resolve_model_errors_say_what_to_do(user_module, spec, message):
    from asyncsgd.model import resolve_model
    with pytest.raises(ValueError, match=message):
        resolve_model(spec.format(mod=user_module))


def test_factory_that_cannot_take_the_shape_raises_value_error(user_module):
    with pytest.raises(ValueError, match="smaller than"):
        build_model(f"{user_module}:freq_cnn", (1, 1, 8), 3)


def test_spec_rebuilds_the_same_network():
    from asyncsgd.model import NumpyOps
    net = build_model("speech_cnn", (1, 24, 30), 5, seed=7)
    again = Network.from_spec("copy", net.spec(), net.input_shape, net.n_classes, ops=NumpyOps(), seed=7)
    assert again.param_layout() == net.param_layout()
    np.testing.assert_array_equal(again.params, net.params)
    x, _ = batch(net, 3)
    np.testing.assert_array_equal(again.forward(x), net.forward(x))
