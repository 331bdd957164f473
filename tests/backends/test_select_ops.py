"""The compute object of a rank (``select_ops``): numpy is the reference, CuPy (on a GPU, or the CPU emulation of the
kernels) must agree.  Moves, staging, top-k selection and the optimizer step are tested here; the network primitives
in tests/model/test_layers.py and tests/backends/test_cuda_kernels.py."""
import numpy
import pytest

import cuda_emulator
from asyncsgd.backends import device as backend_device
from asyncsgd.backends import BackendError, gpu_count, select_ops
from asyncsgd.backends import cuda_kernels as kernels
from asyncsgd.model import NumpyOps, build_model


@pytest.fixture(params=["numpy", pytest.param("cupy", marks=pytest.mark.gpu),
                        pytest.param("emulated", marks=pytest.mark.slow)])
def ops(request, monkeypatch):
    if request.param == "numpy":
        return NumpyOps()
    from asyncsgd.backends.cupy_ops import CupyOps
    if request.param == "cupy":
        return CupyOps(device_id=0)
    if cuda_emulator.compiler() is None:
        pytest.skip("the CPU emulation of the kernels needs g++")
    fake = cuda_emulator.fake_cupy()
    monkeypatch.setattr(backend_device, "import_cupy", lambda: fake)
    kernels.module.cache_clear()
    request.addfinalizer(kernels.module.cache_clear)
    return CupyOps()


def test_select_ops_gives_one_compute_object(monkeypatch):
    cpu = select_ops("cpu")
    assert type(cpu) is NumpyOps and not cpu.is_gpu and cpu.device == "cpu" and cpu.xp is numpy
    monkeypatch.setenv("ASYNCSGD_FORCE_CPU", "1")
    assert type(select_ops("auto")) is NumpyOps
    with pytest.raises(ValueError, match="--device must be one of"):
        select_ops("tpu")
    if gpu_count() == 0:
        with pytest.raises(BackendError, match="--device gpu was asked for"):
            select_ops("gpu")


def test_moves_between_host_and_device(ops):
    host = numpy.arange(10, dtype=numpy.float32)
    dev = ops.to_device(host)
    assert isinstance(dev, ops.xp.ndarray)
    back = ops.to_host(dev * 2)
    assert type(back) is numpy.ndarray and numpy.array_equal(back, host * 2)
    out = numpy.zeros(10, numpy.float32)
    assert ops.to_host(dev, out=out) is out and numpy.array_equal(out, host)
    if not getattr(ops.xp, "emulated", False):          # the emulation runs kernels synchronously, no streams
        ops.synchronize()


@pytest.mark.parametrize("kind", ["numpy", pytest.param("cupy", marks=pytest.mark.gpu)])
def test_staging_buffer_is_a_host_array(kind):
    ops = NumpyOps() if kind == "numpy" else select_ops("gpu")
    buf = ops.staging_buffer(1000, numpy.float32)
    assert isinstance(buf, numpy.ndarray) and buf.shape == (1000,) and buf.dtype == numpy.float32
    dev = ops.to_device(numpy.ones(1000, numpy.float32))
    assert numpy.array_equal(ops.to_host(dev, out=buf), numpy.ones(1000))


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float64])
def test_sgd_update_is_the_trainers_momentum_step_bit_for_bit(ops, dtype):
    rng = numpy.random.default_rng(1)
    params, grad, velocity = (rng.standard_normal(3001).astype(dtype) for _ in range(3))
    want_p, want_v = params.copy(), velocity.copy()
    want_v *= dtype(0.9)                  # what the serial and sync trainers do with numpy today
    want_v += grad
    want_p -= dtype(0.05) * want_v
    p, v = ops.to_device(params.copy()), ops.to_device(velocity.copy())
    ops.sgd_update(p, ops.to_device(grad), lr=0.05, momentum=0.9, velocity=v)
    assert numpy.array_equal(ops.to_host(p), want_p) and numpy.array_equal(ops.to_host(v), want_v)


def test_select_topk_and_scatter_add_keep_every_value(ops):
    from asyncsgd.backends import sparse
    rng = numpy.random.default_rng(2)
    accrued, residual = rng.standard_normal(20_011).astype(numpy.float32), numpy.zeros(20_011, numpy.float32)
    want_idx, _ = sparse.select_topk(accrued, 0.01, residual.copy())
    res = ops.to_device(residual.copy())
    idx, values = ops.select_topk(ops.to_device(accrued), 0.01, res)
    idx, values = ops.to_host(idx), ops.to_host(values)
    assert numpy.array_equal(idx, want_idx)
    dense = ops.to_device(ops.to_host(res))
    ops.scatter_add(dense, ops.to_device(idx), ops.to_device(values))
    assert numpy.array_equal(ops.to_host(dense), accrued)


def test_a_network_runs_on_the_rank_ops(ops):
    net = build_model("logreg", (1, 6, 5), 3, ops=ops, xp=ops.xp, seed=0)
    rng = numpy.random.default_rng(3)
    x, y = rng.standard_normal((50, 1, 6, 5)).astype(numpy.float32), rng.integers(0, 3, 50)
    velocity = ops.xp.zeros(net.n_params, numpy.float32)
    first = net.loss(ops.to_device(x), ops.to_device(y))
    for _ in range(30):
        net.loss_and_grad(ops.to_device(x), ops.to_device(y))
        ops.sgd_update(net.params, net.grads, lr=0.1, momentum=0.9, velocity=velocity)
    assert net.loss(ops.to_device(x), ops.to_device(y)) < 0.7 * first


# ---- intra-op threads ----------------------------------------------------------------------------------------------

def test_intra_op_threads_follow_the_blas_environment(monkeypatch):
    from asyncsgd.backends import threads as parallel
    for name in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.delenv(name, raising=False)
    assert parallel.intra_op_threads() == 1                 # nothing asked: one thread per rank
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert parallel.intra_op_threads() == 3
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "2")         # OpenBLAS reads its own variable first
    assert parallel.intra_op_threads() == 2
    monkeypatch.setenv("OPENBLAS_NUM_THREADS", "lots")      # not a count: the next variable decides
    assert parallel.intra_op_threads() == 3
    if parallel.blas_pinnable():
        assert NumpyOps().threads == 3
    assert NumpyOps(threads=1).threads == 1


def test_numpy_ops_threads_validated():
    with pytest.raises(ValueError, match="threads must be >= 1"):
        NumpyOps(threads=0)
    with pytest.raises(TypeError, match="threads must be an int"):
        NumpyOps(threads=2.5)


def test_split_batch_covers_every_row_once():
    from asyncsgd.backends.threads import split_batch
    assert split_batch(64, 2) == [(0, 32), (32, 64)]
    assert split_batch(7, 3) == [(0, 3), (3, 5), (5, 7)]
    assert split_batch(2, 5) == [(0, 1), (1, 2)]


@pytest.fixture
def blas_threads():
    """OpenBLAS's thread count getter, with the count set to 2 for the test and restored after (skip without it)."""
    from asyncsgd.backends import threads as parallel
    funcs = parallel._openblas()
    if funcs is None:
        pytest.skip("numpy's BLAS is not an OpenBLAS whose thread count can be set")
    setter, getter = funcs
    before = getter()
    setter(2)
    try:
        yield getter
    finally:
        setter(before)


def test_single_thread_blas_pins_and_restores(blas_threads):
    """OpenBLAS runs on one thread inside the section (nested sections too) and gets its count back after."""
    from asyncsgd.backends import threads as parallel
    with parallel.single_thread_blas():
        assert blas_threads() == 1
        with parallel.single_thread_blas():
            assert blas_threads() == 1
        assert blas_threads() == 1
    assert blas_threads() == 2


def test_part_runner_waits_for_every_part_and_raises():
    from asyncsgd.backends.threads import PartRunner
    runner = PartRunner(3)
    done = []

    def work(i):
        if i == 0:
            raise RuntimeError("part 0 failed")
        done.append(i)
        return i

    with pytest.raises(RuntimeError, match="part 0 failed"):
        runner.run(work, 3)
    assert sorted(done) == [1, 2]                           # the other parts finished before the error surfaced
    assert runner.run(lambda i: i * i, 4) == [0, 1, 4, 9]
    runner.close()


def test_network_passes_keep_openblas_on_one_thread_with_intra_op_threads(blas_threads):
    """With threads > 1 every layer of a forward and a backward pass (dense GEMMs included) runs with OpenBLAS on one
    thread: a multi-threaded GEMM would leave an OpenBLAS worker spinning beside the batch parts.  The BLAS thread
    count comes back after the pass; with one thread the pass leaves OpenBLAS alone."""
    for threads, inside in ((2, 1), (1, 2)):
        net = build_model("speech_cnn", (1, 12, 16), 10, ops=NumpyOps(threads=threads), seed=0)
        seen = []
        dense = next(layer for layer in net.layers if layer.kind == "dense")
        forward, backward = dense.forward, dense.backward
        dense.forward = lambda *a, **k: (seen.append(blas_threads()), forward(*a, **k))[1]
        dense.backward = lambda *a, **k: (seen.append(blas_threads()), backward(*a, **k))[1]
        rng = numpy.random.default_rng(0)
        net.loss_and_grad(rng.standard_normal((8, 1, 12, 16)).astype(numpy.float32), rng.integers(0, 10, 8))
        assert seen == [inside, inside] and blas_threads() == 2
