"""The public training API: exports, option dataclasses, staleness rules, the four modes called from Python,
and the layering rule that the algorithms never import the command line."""
import dataclasses
import os
import pathlib

import numpy
import pytest

import asyncsgd
from asyncsgd import (DownpourOptions, ExponentialDecay, InverseDecay, NoDecay, OptionError, SandblasterOptions,
                      SGDOptions, Stop)
from asyncsgd.plan import sgd_defaults
from asyncsgd.data.synthetic import SyntheticSource

PACKAGE = pathlib.Path(asyncsgd.__file__).parent


def test_public_names_are_exported():
    for name in ("train_mode", "train_serial", "train_sync", "train_downpour", "train_sandblaster", "Stop",
                 "SGDOptions", "DownpourOptions", "SandblasterOptions", "CheckpointOptions", "ExponentialDecay"):
        assert name in asyncsgd.__all__
        assert getattr(asyncsgd, name) is not None
    with pytest.raises(AttributeError):
        asyncsgd.no_such_name  # noqa: B018


@pytest.mark.parametrize("cls, kwargs, field", [
    (SGDOptions, dict(lr=0), "lr"), (SGDOptions, dict(momentum=1.0), "momentum"),
    (SGDOptions, dict(batch_size=0), "batch_size"), (SGDOptions, dict(batch_size=2.5), "batch_size"),
    (SGDOptions, dict(optimizer="adam"), "optimizer"), (SGDOptions, dict(augment="shift:x"), "augment"),
    (SGDOptions, dict(seed=-1), "seed"), (SGDOptions, dict(eval_every=0), "eval_every"),
    (DownpourOptions, dict(sparsity=0), "sparsity"), (DownpourOptions, dict(sparsity=1.5), "sparsity"),
    (DownpourOptions, dict(n_push=0), "n_push"), (DownpourOptions, dict(servers=0), "servers"),
    (DownpourOptions, dict(staleness="exp:0.9"), "staleness"), (DownpourOptions, dict(lr=-1.0), "lr"),
    (DownpourOptions, dict(warm_start_steps=-1), "warm_start_steps"),
    (SandblasterOptions, dict(history=0), "history"), (SandblasterOptions, dict(slow_ranks={1: 0.5}), "slow_ranks"),
    (Stop, dict(epochs=0), "epochs"), (Stop, dict(steps=0), "steps"), (Stop, dict(target_accuracy=1.5),
                                                                        "target_accuracy"),
    (Stop, dict(time_limit=float("nan")), "time_limit"),
])
def test_bad_option_names_its_field(cls, kwargs, field):
    with pytest.raises(OptionError) as err:
        cls(**kwargs)
    assert err.value.field == field and str(err.value).startswith(field)
    assert isinstance(err.value, ValueError)


def test_options_are_frozen_and_defaults_fill_a_copy():
    opts = DownpourOptions(n_push=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.lr = 0.1
    filled, stop = sgd_defaults(opts, Stop(), "speech_cnn", async_replicas=5)
    assert opts.lr is None and opts.batch_size is None  # the caller's object is untouched
    # the default schedule has a warm-up: peak 0.01 x 3/W; a schedule without one keeps 2/W; more than 3 workers
    # halve the model's batch (32) and the rate with it
    assert filled.lr == pytest.approx(0.01 * 3 / 5 / 2) and filled.momentum == 0.9 and filled.batch_size == 16
    assert sgd_defaults(DownpourOptions(lr_schedule="constant"), Stop(), "speech_cnn", 5)[0].lr == pytest.approx(0.002)
    # a batch given keeps its rate unhalved; 3 workers and Adagrad keep the model's batch
    given = sgd_defaults(DownpourOptions(batch_size=32), Stop(), "speech_cnn", 5)[0]
    assert (given.lr, given.batch_size) == (pytest.approx(0.006), 32)
    three = sgd_defaults(DownpourOptions(), Stop(), "speech_cnn", 3)[0]
    assert (three.lr, three.batch_size) == (pytest.approx(0.01), 32)
    ada = sgd_defaults(DownpourOptions(optimizer="adagrad"), Stop(), "speech_cnn", 5)[0]
    assert (ada.lr, ada.batch_size) == (0.01, 32)
    assert filled.n_push == 4 and isinstance(filled, DownpourOptions)
    assert stop == Stop(epochs=30)
    # a stop rule given by the user is kept as it is (no default epochs added)
    assert sgd_defaults(opts, Stop(steps=3), "speech_cnn")[1] == Stop(steps=3)


def test_staleness_rules():
    assert [NoDecay()(t) for t in (0, 3)] == [1.0, 1.0]
    assert [InverseDecay()(t) for t in (0, 1, 4)] == [1.0, 1.0, 0.25]
    assert ExponentialDecay(0.5)(3) == pytest.approx(0.125)
    with pytest.raises(OptionError, match="staleness"):
        ExponentialDecay(1.5)
    DownpourOptions(staleness=lambda tau: 1.0 / (1 + tau))  # any callable is a rule


def test_serial_from_python(tmp_path):
    """train_serial with a callable factory, an open data source and a Stop; the result saves a model file."""
    from asyncsgd.model import Dense, Flatten, Network
    from asyncsgd.model.files import read_model

    built = []

    def tiny(input_shape, n_classes, *, ops, seed=0):
        built.append(seed)
        return Network("tiny", [Flatten(), Dense(n_classes)], input_shape, n_classes, ops=ops, seed=seed)

    src = SyntheticSource(300, seed=1)
    result = asyncsgd.train_serial(tiny, src, SGDOptions(lr=0.05, batch_size=16, seed=3), Stop(steps=30),
                                   progress="none")
    assert built == [3]  # the network is built once, from the options' seed
    assert result.summary["mode"] == "serial" and result.summary["steps"] == 30
    assert result.summary["stop_reason"] == "steps"
    assert result.params.shape == (result.summary["n_params"],)
    assert result.summary["config"]["lr"] == 0.05
    path = tmp_path / "tiny.h5"
    result.save_model(path)
    params, meta = read_model(str(path))
    numpy.testing.assert_array_equal(params, result.params)
    assert meta["model"].endswith(":test_serial_from_python.<locals>.tiny")
    assert meta["spec"] is not None  # the layers are recorded: asyncsgd.load_model needs no user code


def test_serial_rejects_bad_input_before_work():
    src = SyntheticSource(100)
    with pytest.raises(TypeError, match="SGDOptions"):
        asyncsgd.train_serial("logreg", src, DownpourOptions())
    with pytest.raises(ValueError, match="unknown model"):
        asyncsgd.train_serial("resnet", src)
    with pytest.raises(ValueError, match="cannot import"):
        asyncsgd.train_serial("no_such_module_xyz:factory", src)


@pytest.mark.mpi(min_size=3)
@pytest.mark.ranks(3)
@pytest.mark.parametrize("mode", ["downpour", "sync", "sandblaster"])
def test_distributed_modes_from_python(mode):
    """Every rank calls the same function; rank 0 gets the TrainResult, the others None."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD.Dup()
    src = SyntheticSource(300, seed=2)
    if mode == "downpour":
        result = asyncsgd.train_downpour("logreg", src, DownpourOptions(batch_size=16, n_push=2,
                                                                        staleness=ExponentialDecay(0.9)),
                                         Stop(steps=20), comm=comm, progress="none")
    elif mode == "sync":
        result = asyncsgd.train_sync("logreg", src, SGDOptions(batch_size=16), Stop(steps=10), comm=comm,
                                     progress="none")
    else:
        result = asyncsgd.train_sandblaster("logreg", src, SandblasterOptions(max_iter=3), comm=comm,
                                            progress="none")
    if comm.rank == 0:
        assert result.summary["mode"] == mode
        assert result.params.shape == (result.summary["n_params"],)
        if mode == "downpour":
            assert result.summary["config"]["staleness_decay"] == "exp:0.9"
            assert result.summary["pushes"] == 2 * 10
    else:
        assert result is None
    comm.Free()


@pytest.mark.mpi(min_size=2)
@pytest.mark.ranks(2, 3)
def test_invalid_layout_raises_on_every_rank_before_work():
    """Every rank raises the same error (no rank is left waiting in a collective)."""
    from mpi4py import MPI
    comm = MPI.COMM_WORLD.Dup()
    with pytest.raises(OptionError, match="servers"):
        asyncsgd.train_downpour("logreg", SyntheticSource(100), DownpourOptions(servers=comm.size), comm=comm)
    with pytest.raises(ValueError, match="mini_shard_size"):
        asyncsgd.train_sandblaster("logreg", SyntheticSource(100),
                                   SandblasterOptions(batch_size=10, mini_shard_size=50), comm=comm)
    comm.Barrier()  # all ranks got here: nobody hung
    comm.Free()


def test_default_comm_is_a_cached_dup():
    from mpi4py import MPI
    a, b = asyncsgd.default_comm(), asyncsgd.default_comm()
    assert a is b and a != MPI.COMM_WORLD
    assert MPI.Comm.Compare(a, MPI.COMM_WORLD) == MPI.CONGRUENT


def test_model_spec_import_path(tmp_path, monkeypatch):
    """'PACKAGE.MODULE:FUNCTION' is imported from the working directory."""
    (tmp_path / "my_nets.py").write_text(
        "from asyncsgd.model import Dense, Flatten, Network\n"
        "def flat(input_shape, n_classes, *, ops, seed=0):\n"
        "    return Network('flat', [Flatten(), Dense(n_classes)], input_shape, n_classes, ops=ops, seed=seed)\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if p not in ("", os.getcwd())])
    from asyncsgd.api import build_network, resolve_model
    from asyncsgd.backends import select_ops
    name, factory = resolve_model("my_nets:flat")
    assert name == "my_nets:flat" and callable(factory)
    net = build_network("my_nets:flat", (1, 4, 5), 3, select_ops("cpu"), seed=0)
    assert net.n_params == 20 * 3 + 3
    with pytest.raises(ValueError, match="has no attribute"):
        resolve_model("my_nets:missing")


def test_exception_on_one_rank_ends_the_job(tmp_path):
    """An error while training (here: rank 2's data read in sync mode) prints that rank's traceback and ends every
    rank.  (Downpour and Sandblaster need the window owners' exit policy too: their context managers free windows
    collectively on the way out, issue 10 item 1.)"""
    import subprocess
    import sys

    from asyncsgd.testing.launch import run_mpi
    script = tmp_path / "failing.py"
    script.write_text(
        "import asyncsgd\n"
        "from mpi4py import MPI\n"
        "from asyncsgd.data.synthetic import SyntheticSource\n"
        "class Flaky(SyntheticSource):\n"
        "    def train_rows(self, rows):\n"   # a worker's share of the training rows (after the validation split)
        "        if MPI.COMM_WORLD.rank == 2:\n"
        "            raise OSError('disk on fire')\n"
        "        return super().train_rows(rows)\n"
        "asyncsgd.train_sync('logreg', Flaky(300), asyncsgd.SGDOptions(batch_size=16),\n"
        "                        asyncsgd.Stop(time_limit=600), progress='none')\n"
        "print('finished normally')\n")
    repo = str(PACKAGE.parent)
    try:
        proc = run_mpi(3, [sys.executable, str(script)], timeout=90,
                       env={**os.environ, "PYTHONPATH": repo}, cwd=tmp_path)
    except subprocess.TimeoutExpired:
        pytest.fail("the job hung after an exception on rank 2")
    assert proc.returncode != 0
    assert "[asyncsgd rank 2]" in proc.stdout and "OSError: disk on fire" in proc.stdout
    assert "finished normally" not in proc.stdout


def test_schedule_and_validation_options_are_checked_when_made():
    from asyncsgd.schedule import Cosine, Warmup
    opts = asyncsgd.SGDOptions(lr_schedule="warmup:0.1+cosine:0.05")
    assert opts.lr_schedule == Warmup(Cosine(floor=0.05), fraction=0.1)
    assert asyncsgd.DownpourOptions(lr_schedule=Cosine()).lr_schedule == Cosine()
    assert str(asyncsgd.SGDOptions().lr_schedule) == "warmup:0.05+cosine" and asyncsgd.SGDOptions().validation == 0.1
    for kwargs, field in [(dict(lr_schedule="wobble"), "lr_schedule"), (dict(lr_schedule=0.1), "lr_schedule"),
                          (dict(validation=1.0), "validation"), (dict(validation=-0.1), "validation")]:
        with pytest.raises(asyncsgd.OptionError) as err:
            asyncsgd.SGDOptions(**kwargs)
        assert err.value.field == field
    with pytest.raises(asyncsgd.OptionError, match="patience"):
        asyncsgd.Stop(patience=0)
    with pytest.raises(ValueError, match="patience needs a validation split"):
        asyncsgd.train_serial("logreg", "synthetic:200", asyncsgd.SGDOptions(validation=0), asyncsgd.Stop(patience=2))


def test_api_result_is_the_selected_model():
    """train_serial returns the selected model's parameters; re-evaluated on the validation rows they score the
    best validation accuracy of the run; the last model is in extras when it differs."""
    from asyncsgd.algorithms.common import TrainingSplit
    from asyncsgd.api import build_network
    from asyncsgd.backends import select_ops
    from asyncsgd.data import open_source
    src = open_source("synthetic:400")
    # selection_margin 0: the best whenever it is better (the default margin is tested in test_best_model.py)
    result = asyncsgd.train_serial("logreg", src, asyncsgd.SGDOptions(lr=0.5, lr_schedule="constant", seed=4,
                                                                      selection_margin=0),
                                   asyncsgd.Stop(epochs=12), progress="none")
    s = result.summary
    net = build_network("logreg", src.input_shape, src.n_classes, select_ops("cpu"), seed=0)
    x, y = TrainingSplit(src, 0.1, 4).validation_set()
    net.params[...] = result.params
    assert float(net.evaluate(x, y)[1]) == pytest.approx(s["best_validation_accuracy"], abs=1e-9)
    assert s["validation_rows"] == 40 and s["lr_schedule"] == "constant" and s["final_lr"] == 0.5
    assert ("last_params" in result.extras) == (s["selected_model"] == "best")
    assert result.test_accuracy == s["selected_test_accuracy"]
