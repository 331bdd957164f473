"""Model files that outlive the run: save -> load rebuilds the same network (same logits) with no user code."""
import sys

import h5py
import numpy as np
import pytest

from asyncsgd.model import Network, NumpyOps, build_model, load_model, save_model
from asyncsgd.model.files import read_model
from asyncsgd.model.files import save_model as save_params

USER_MODULE = '''
from asyncsgd.model import AvgPool2D, Conv2D, Dense, Dropout, Flatten, MaxPool2D, Network, ReLU, Sigmoid, Tanh

def rect_cnn(input_shape, n_classes, *, ops, seed=0):
    layers = [Conv2D(6, (5, 3), stride=(1, 2), pad=(2, 1)), MaxPool2D((2, 1)), Tanh(),
              Conv2D(8, 3, pad=1), AvgPool2D((2, 2), (2, 1)), Sigmoid(),
              Flatten(), Dense(16), ReLU(), Dropout(0.2), Dense(n_classes)]
    return Network("rect_cnn", layers, input_shape, n_classes, ops=ops, seed=seed)
'''


def _inputs(net, n=5, seed=0):
    return np.random.default_rng(seed).standard_normal((n,) + net.input_shape).astype(net.dtype)


@pytest.mark.parametrize("name,shape", [("speech_cnn", (1, 24, 20)), ("mnist_cnn", (1, 28, 28)),
                                        ("logreg", (1, 8, 8))])
def test_builtin_round_trip_gives_identical_logits(tmp_path, name, shape):
    net = build_model(name, shape, 7, seed=3)
    net.params += 0.01 * np.random.default_rng(1).standard_normal(net.n_params).astype(np.float32)  # "trained"
    save_model(tmp_path / "m.h5", net, {"test_accuracy": 0.5})
    again = load_model(tmp_path / "m.h5")
    assert isinstance(again, Network) and again.factory == name and again.name == name
    assert again.spec() == net.spec() and again.param_layout() == net.param_layout()
    assert again.meta["test_accuracy"] == 0.5
    x = _inputs(net)
    np.testing.assert_array_equal(again.forward(x), net.forward(x))


def test_user_factory_round_trip_needs_no_user_code(tmp_path, monkeypatch):
    folder = tmp_path / "code"
    folder.mkdir()
    (folder / "user_nets_modelio.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(folder))
    net = build_model("user_nets_modelio:rect_cnn", (1, 20, 12), 4, seed=5)
    save_model(tmp_path / "user.h5", net)
    x = _inputs(net, 6)
    want = net.forward(x)
    # The user's code is gone: no module file, no cached module.
    (folder / "user_nets_modelio.py").unlink()
    sys.modules.pop("user_nets_modelio", None)
    again = load_model(tmp_path / "user.h5")
    assert again.factory == "user_nets_modelio:rect_cnn" and again.name == "rect_cnn"
    assert [s["type"] for s in again.spec()] == ["Conv2D", "MaxPool2D", "Tanh", "Conv2D", "AvgPool2D", "Sigmoid",
                                                 "Flatten", "Dense", "ReLU", "Dropout", "Dense"]
    np.testing.assert_array_equal(again.forward(x), want)
    _, meta = read_model(tmp_path / "user.h5")
    assert meta["model"] == "user_nets_modelio:rect_cnn" and meta["format_version"] == 2


def test_trainer_style_save_by_name_records_the_layers(tmp_path):
    """The trainer saves a host parameter vector by model name: the layers are derived from the name."""
    net = build_model("speech_cnn", (1, 16, 16), 10, seed=2)
    save_params(tmp_path / "t.h5", net.params, net.param_layout(),
                {"model": "speech_cnn", "input_shape": [1, 16, 16], "n_classes": 10, "config": {"data": "fsdd"}})
    _, meta = read_model(tmp_path / "t.h5")
    assert meta["spec"] == net.spec()
    again = load_model(tmp_path / "t.h5")
    np.testing.assert_array_equal(again.params, net.params)


def test_float64_models_stay_float64(tmp_path):
    net = build_model("logreg", (1, 4, 4), 3, dtype=np.float64, seed=1)
    save_model(tmp_path / "d.h5", net)
    again = load_model(tmp_path / "d.h5", ops=NumpyOps())
    assert again.dtype == np.float64
    np.testing.assert_array_equal(again.params, net.params)


def test_files_that_cannot_be_rebuilt_say_why(tmp_path):
    params = np.zeros(90, np.float32)
    save_params(tmp_path / "nolayers.h5", params, [("w", 0, (90,))],
                {"model": "speech_cnn", "input_shape": (1, 40, 32), "n_classes": 10})
    with pytest.raises(ValueError, match="records no layers"):
        load_model(tmp_path / "nolayers.h5")
    net = build_model("logreg", (1, 4, 4), 3)
    save_model(tmp_path / "ok.h5", net)
    with h5py.File(tmp_path / "ok.h5", "a") as f:
        f.attrs["spec"] = '[{"type": "Flatten"}, {"type": "Mystery"}]'
    with pytest.raises(ValueError, match="ok.h5: its layers do not rebuild.*Mystery"):
        load_model(tmp_path / "ok.h5")
    with pytest.raises(ValueError, match="does not exist"):
        load_model(tmp_path / "missing.h5")
