"""The compiled CPU kernels of the fused conv + 2x2 max pool (kernels/conv_pool_cpu.c, asyncsgd/backends/cpu_kernels.py).

They replace the numpy copies and masks around the fused layer's GEMMs and must change no result: every test here
compares the two paths of NumpyOps bit for bit (``np.array_equal``), on odd shapes, strided inputs, batch parts,
NaN and ties, and through the trainer's CLI.  Where a C compiler and Python's headers exist (this project's CI) the
module must have been built, so a broken build fails here instead of silently running the slow path.
"""
import os
import subprocess

import numpy as np
import pytest

from asyncsgd.model import NumpyOps, build_model
from asyncsgd.backends import cpu_kernels
from c_build import can_build_c_extensions
from jobs import TRAIN
from paths import REPO as ROOT

built = pytest.mark.skipif(not cpu_kernels.available(), reason="the compiled module _asyncsgd_cpu is not built")

# (C, N, H, W, F, (kh, kw), (ph, pw)): speech_cnn's two layers, rectangular kernels, uneven paddings, odd sizes whose
# last conv row/column the pooling drops, a 1x1 kernel.
SHAPES = [(1, 8, 40, 64, 16, (5, 5), (2, 2)), (16, 6, 20, 32, 32, (3, 3), (1, 1)), (3, 5, 9, 7, 4, (3, 2), (0, 1)),
          (2, 3, 6, 11, 5, (5, 3), (2, 0)), (2, 4, 5, 5, 3, (1, 1), (0, 0))]


def _fused_pass(ops, x, w, b, pad, relu, steps=2, need_dx=True):
    """Run ``steps`` forward+backward passes (reusing the workspace, as a training loop does); return the last."""
    ws, rng = {}, np.random.default_rng(7)
    for _ in range(steps):
        y, cache = ops.conv2d_maxpool_forward(x, w, b, pad, ws, relu=relu)
        dy = rng.standard_normal(y.shape).astype(np.float32)
        dy = np.asfortranarray(dy)                          # a strided gradient, as a layer above may hand down
        dw, db = np.empty_like(w), np.empty_like(b)
        dx = ops.conv2d_maxpool_backward(dy, cache, w, dw, db, need_dx, ws)
    return [y.copy(), dw, db, None if dx is None else dx.copy()]


def _inputs(shape, seed=0):
    c, n, h, wd, f, (kh, kw), _ = shape
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, c, h, wd)).astype(np.float32).transpose(1, 0, 2, 3)   # (C, N, H, W), not contiguous
    w = rng.standard_normal((f, c, kh, kw)).astype(np.float32)
    b = rng.standard_normal(f).astype(np.float32)
    return x, w, b


def _assert_same(a, b, nan=False):
    for u, v in zip(a, b):
        if u is None or v is None:
            assert u is None and v is None
            continue
        assert u.dtype == v.dtype and u.shape == v.shape
        assert np.array_equal(u, v, equal_nan=nan), f"max difference {np.nanmax(np.abs(u - v))}"


def test_built_wherever_a_compiler_and_python_headers_exist():
    """pip install builds the module as an optional extension: where it can be built it must have been."""
    if not can_build_c_extensions():
        pytest.skip("no C compiler or Python headers here: the numpy path is the one that runs")
    assert cpu_kernels.available(), ("_asyncsgd_cpu is missing or stale: reinstall (pip install .) or, in a source "
                                     "checkout, python setup.py build_ext --inplace")
    assert NumpyOps().cpu_kernels_on or not cpu_kernels.switch()


@built
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_fused_conv_pool_bit_identical_to_numpy(shape, relu, threads):
    x, w, b = _inputs(shape)
    pad = shape[-1]
    theirs = _fused_pass(NumpyOps(threads=threads, cpu_kernels_on=False), x, w, b, pad, relu)
    ours = _fused_pass(NumpyOps(threads=threads, cpu_kernels_on=True), x, w, b, pad, relu)
    _assert_same(ours, theirs)
    first = _fused_pass(NumpyOps(threads=threads, cpu_kernels_on=True), x, w, b, pad, relu, need_dx=False)
    _assert_same(first[:3], theirs[:3])
    assert first[3] is None


@built
def test_the_compiled_path_really_runs(monkeypatch):
    """With the kernels on, none of the numpy code they replace is called (so the comparisons above compare two
    different implementations); with them off it is."""
    x, w, b = _inputs(SHAPES[2])
    calls = []
    original = NumpyOps._max4
    monkeypatch.setattr(NumpyOps, "_max4", lambda self, *a: calls.append(1) or original(self, *a))
    monkeypatch.setattr(NumpyOps, "_parity_slices", staticmethod(lambda *a: pytest.fail("numpy planes used")))
    _fused_pass(NumpyOps(cpu_kernels_on=True), x, w, b, (0, 1), True)
    assert calls == []
    monkeypatch.undo()
    monkeypatch.setattr(NumpyOps, "_max4", lambda self, *a: calls.append(1) or original(self, *a))
    _fused_pass(NumpyOps(cpu_kernels_on=False), x, w, b, (0, 1), True)
    assert calls


@built
@pytest.mark.parametrize("relu", [False, True])
def test_nan_and_ties_as_numpy(relu):
    """A NaN input spreads to the same outputs and gradients; windows of equal values route to the first one."""
    x, w, b = _inputs(SHAPES[3], seed=3)
    x = x.copy()
    x[0, 1, 2, 3] = np.nan
    for case in (x, np.ones_like(x)):                    # ones: every window of every filter is a four-way tie
        theirs = _fused_pass(NumpyOps(cpu_kernels_on=False), case, w, b, (2, 0), relu)
        ours = _fused_pass(NumpyOps(cpu_kernels_on=True), case, w, b, (2, 0), relu)
        _assert_same(ours, theirs, nan=True)
        assert np.isnan(ours[0]).any() == (case is x)


@built
@pytest.mark.parametrize("threads", [1, 2])
def test_speech_cnn_loss_and_gradients_bit_identical(threads):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 1, 40, 64)).astype(np.float32)
    y = rng.integers(0, 10, 16)
    results = []
    for on in (False, True):
        net = build_model("speech_cnn", (1, 40, 64), 10, ops=NumpyOps(threads=threads, cpu_kernels_on=on), seed=3)
        losses = [net.loss_and_grad(x, y, rng=np.random.default_rng(1)) for _ in range(2)]
        results.append((losses, net.grads.copy(), net.forward(x).copy()))
    assert results[0][0] == results[1][0]
    assert np.array_equal(results[0][1], results[1][1]) and np.array_equal(results[0][2], results[1][2])


def test_float64_networks_use_numpy():
    """The kernels are float32 only; a float64 network (the gradient checks) runs the numpy code on any ops."""
    x, w, b = _inputs(SHAPES[2])
    x64, w64, b64 = x.astype(np.float64), w.astype(np.float64), b.astype(np.float64)
    ops = NumpyOps(cpu_kernels_on=cpu_kernels.available())
    y, _ = ops.conv2d_maxpool_forward(x64, w64, b64, (0, 1))
    assert y.dtype == np.float64


def test_switches(monkeypatch):
    """ASYNCSGD_CPU_KERNELS=0 turns them off and a value it does not know is an error; cpu_kernels_on must be a
    bool or None, and True without a build is a clear error."""
    monkeypatch.setenv("ASYNCSGD_CPU_KERNELS", "0")
    assert not cpu_kernels.enabled() and not NumpyOps().cpu_kernels_on
    monkeypatch.setenv("ASYNCSGD_CPU_KERNELS", "1")
    assert cpu_kernels.enabled() == cpu_kernels.available() == NumpyOps().cpu_kernels_on
    assert not NumpyOps(cpu_kernels_on=False).cpu_kernels_on
    for word, on in (("off", False), ("No", False), ("", True), ("yes", True), (" true ", True)):
        assert cpu_kernels.switch({"ASYNCSGD_CPU_KERNELS": word}) is on
    monkeypatch.setenv("ASYNCSGD_CPU_KERNELS", "maybe")
    with pytest.raises(ValueError, match="ASYNCSGD_CPU_KERNELS='maybe' is not a switch"):
        NumpyOps()
    monkeypatch.setenv("ASYNCSGD_CPU_KERNELS", "1")
    with pytest.raises(TypeError, match="None, True or False"):
        NumpyOps(cpu_kernels_on="yes")
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    with pytest.raises(RuntimeError, match="build_ext --inplace"):
        NumpyOps(cpu_kernels_on=True)
    assert not NumpyOps().cpu_kernels_on


@built
def test_wrappers_refuse_what_c_would_misread():
    """The C code trusts its pointers: the wrappers check dtypes, shapes and sizes first."""
    f, m = 3, 10
    y, out = np.zeros((f, 4, m), np.float32), np.zeros((f, m), np.float32)
    arg = np.zeros((f, m), np.uint8)
    with pytest.raises(TypeError, match="float32"):
        cpu_kernels.max4(y.astype(np.float64), out, arg, False)
    with pytest.raises(ValueError, match="unit column stride"):
        cpu_kernels.max4(y, np.zeros((f, 2 * m), np.float32)[:, ::2], arg, False)
    frozen = out.copy()
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="read-only"):
        cpu_kernels.max4(y, frozen, arg, False)
    with pytest.raises(ValueError, match="arg uint8"):
        cpu_kernels.max4(y, out, np.zeros((f, m + 1), np.uint8), False)
    with pytest.raises(ValueError, match="C-contiguous"):
        cpu_kernels.max4(y[:, :, ::2], out[:, :5], arg[:, :5], False)
    x = np.zeros((2, 3, 6, 6), np.float32)
    col = np.zeros((2 * 9 + 1, 4 * 3 * 12), np.float32)
    with pytest.raises(ValueError, match="planes"):
        cpu_kernels.im2col(x, col, 3, 3, (1, 1), 2, 2, 12)            # planes far too small for a 6x6 input
    with pytest.raises(ValueError, match="rows"):
        cpu_kernels.im2col(x, col[:5], 3, 3, (1, 1), 5, 4, 12)
    with pytest.raises(ValueError, match="contiguous rows"):
        cpu_kernels.col2im(col[:18, ::2], x, 3, 3, (1, 1), 5, 4, 12)
    with pytest.raises(ValueError, match=r"is not \(18, 144\)"):
        cpu_kernels.col2im(col, x, 3, 3, (1, 1), 5, 4, 12)
    with pytest.raises(ValueError, match="wh <= wq"):
        cpu_kernels.pool_grad(np.zeros((f, 1, 1, 11), np.float32), None, arg, np.zeros((f, 4, m), np.float32), 10)


@pytest.mark.slow
@built
def test_trainer_results_unchanged_through_the_cli(tmp_path):
    """python -m asyncsgd.train (serial, deterministic) writes the same model and loss with the kernels on and off."""
    results = []
    for on in ("1", "0"):
        out = tmp_path / f"kernels{on}"
        env = dict(os.environ, ASYNCSGD_CPU_KERNELS=on, OPENBLAS_NUM_THREADS="1", OMP_NUM_THREADS="1")
        proc = subprocess.run(TRAIN + ["--mode", "serial", "--data", "synthetic:400", "--steps", "12", "--seed", "5",
                                       "--progress", "none", "--run-dir", str(out)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr
        import h5py
        import json
        with h5py.File(out / "model.h5") as model:
            params = model["params"][...]
        summary = json.loads((out / "summary.json").read_text())
        results.append((params, summary["final_loss"], summary["test_accuracy"]))
    assert np.array_equal(results[0][0], results[1][0])
    assert results[0][1:] == results[1][1:]
