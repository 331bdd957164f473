"""GPU kernels against the libraries a user would otherwise call, and a GPU worker step against the CPU one.

    python benchmarks/bench_gpu.py [--batch 32] [--n 10000000] [--fraction 0.01] [--repeats 20] [--json FILE]

Prints, each measured in this one run (median of --repeats after warm-up; GPUs are shared too):
1. convolution forward + backward (dw, db, dx) of every conv layer of speech_cnn and mnist_cnn: asyncsgd's CupyOps
   (im2col/col2im kernels + cuBLAS) against cuDNN, through cupyx.cudnn when CuPy has it (CuPy < 14; v14 dropped
   cuDNN), else PyTorch CUDA's cuDNN; TF32 off on both sides (CuPy's default), so both compute in full float32;
   goal: asyncsgd at >= 0.8x cuDNN's speed;
2. sparse selection of --fraction of --n float32 entries with error feedback: asyncsgd.backends.cuda_sparse.select_topk
   (exact k, and with tolerance 0.05) against cupy.argpartition and a full cupy.argsort; goal: >= 3x faster than
   the sort;
3. one Downpour worker step (loss_and_grad of speech_cnn on a --batch mini-batch + top-k selection of the gradient +
   copying the pairs to host memory for the push) on the GPU against the numpy CPU path (with as many BLAS threads
   as the environment gives it: one per worker in benchmarks/device_check.py).
--json FILE writes the same figures as JSON.  Needs a CUDA GPU and CuPy; exits with status 2 and a message
otherwise.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy  # noqa: E402

from asyncsgd.backends import device as backend  # noqa: E402

# (model, layer, C, H, W, F, k, pad) of every convolution of the two CNNs (stride 1), asyncsgd/model/builders.py
CONV_LAYERS = [("speech_cnn", "conv1", 1, 40, 64, 16, 5, 2), ("speech_cnn", "conv2", 16, 20, 32, 32, 3, 1),
               ("mnist_cnn", "conv1", 1, 28, 28, 16, 5, 2), ("mnist_cnn", "conv2", 16, 14, 14, 32, 5, 2)]


def median_ms(fn, sync, repeats, warmup=3):
    """Return the median wall time of ``fn()`` in ms, synchronising the device (``sync()``) around each call."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def cudnn_conv(cupy, x, w, b, gy, pad):
    """Return a callable doing forward + backward-filter + backward-data + bias gradient with cuDNN, or None."""
    try:                            # cupyx.cudnn in CuPy >= 11, cupy.cudnn before; either fails without cuDNN
        from cupyx import cudnn
    except Exception:
        try:
            from cupy import cudnn
        except Exception:
            return None
    y = cupy.empty_like(gy)
    gw, gx = cupy.empty_like(w), cupy.empty_like(x)
    geometry = ((pad, pad), (1, 1), (1, 1), 1)          # pad, stride, dilation, groups

    def step():
        cudnn.convolution_forward(x, w, b, y, *geometry, auto_tune=True, tensor_core="never")
        cudnn.convolution_backward_filter(x, gy, gw, *geometry, deterministic=False, auto_tune=True,
                                          tensor_core="never")
        cudnn.convolution_backward_data(w, gy, None, gx, *geometry, deterministic=False, auto_tune=True,
                                        tensor_core="never")
        gy.sum(axis=(0, 2, 3))

    try:
        step()
    except Exception as e:          # cuDNN libraries missing at run time
        print(f"  (cupyx.cudnn unusable: {type(e).__name__}: {e})")
        return None
    return step


def torch_conv(n, c, h, w_, f, k, pad):
    """Return (callable, sync) doing the same with PyTorch CUDA (cuDNN), or None without torch/CUDA."""
    try:
        import torch
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    dev = torch.device("cuda")
    x = torch.randn(n, c, h, w_, device=dev, requires_grad=True)
    wt = torch.randn(f, c, k, k, device=dev, requires_grad=True)
    b = torch.randn(f, device=dev, requires_grad=True)
    gy = torch.randn(n, f, h + 2 * pad - k + 1, w_ + 2 * pad - k + 1, device=dev)

    def step():
        y = torch.nn.functional.conv2d(x, wt, b, padding=pad)
        y.backward(gy)

    return step, torch.cuda.synchronize


def bench_conv(cupy, args):
    from asyncsgd.backends.cupy_ops import CupyOps
    print(f"1. convolution forward+backward, batch {args.batch}, float32 (ms; ratio = asyncsgd / cuDNN)")
    ops, sync = CupyOps(), cupy.cuda.get_current_stream().synchronize
    rng = numpy.random.default_rng(0)
    rows = []
    for model, layer, c, h, w_, f, k, pad in CONV_LAYERS:
        n = args.batch
        x = cupy.asarray(rng.standard_normal((c, n, h, w_)), cupy.float32)
        wt = cupy.asarray(rng.standard_normal((f, c, k, k)), cupy.float32)
        b = cupy.asarray(rng.standard_normal(f), cupy.float32)
        ho, wo = h + 2 * pad - k + 1, w_ + 2 * pad - k + 1
        dy = cupy.asarray(rng.standard_normal((f, n, ho, wo)), cupy.float32)
        dw, db, ws = cupy.empty_like(wt), cupy.empty_like(b), {}

        def ours():
            _, cache = ops.conv2d_forward(x, wt, b, 1, pad, ws=ws)
            ops.conv2d_backward(dy, cache, wt, dw, db, ws=ws)

        t_ours = median_ms(ours, sync, args.repeats)
        ref_name, t_ref = "none", None
        x_nchw = cupy.ascontiguousarray(x.transpose(1, 0, 2, 3))
        dy_nchw = cupy.ascontiguousarray(dy.transpose(1, 0, 2, 3))
        step = cudnn_conv(cupy, x_nchw, wt, b, dy_nchw, pad)
        if step is not None:
            ref_name, t_ref = "cupyx.cudnn", median_ms(step, sync, args.repeats)
        else:
            found = torch_conv(n, c, h, w_, f, k, pad)
            if found is not None:
                ref_name, t_ref = "torch", median_ms(found[0], found[1], args.repeats)
        ratio = f"{t_ours / t_ref:6.2f}" if t_ref else "   n/a"
        ref_txt = f"{t_ref:8.3f}" if t_ref else "     n/a"
        print(f"  {model:10s} {layer}  ({c:2d},{h:2d},{w_:2d})->{f:2d} k{k}  asyncsgd {t_ours:8.3f}  "
              f"{ref_name} {ref_txt}  ratio {ratio}")
        rows.append({"model": model, "layer": layer, "shape": [c, h, w_, f, k, pad], "batch": n, "ours_ms": t_ours,
                     "reference": ref_name, "ref_ms": t_ref, "speed_vs_ref": t_ref / t_ours if t_ref else None})
    return rows


def bench_select(cupy, args):
    from asyncsgd.backends import cuda_sparse as gsparse
    from asyncsgd.backends.sparse import topk_count
    n, frac = args.n, args.fraction
    k = topk_count(n, frac)
    print(f"2. top-k selection with residual, n = {n:,}, fraction {frac} (k = {k:,}), float32 (ms)")
    sync = cupy.cuda.get_current_stream().synchronize
    rng = cupy.random.default_rng(0)
    accrued = rng.standard_normal(n, dtype=cupy.float32)
    residual = cupy.zeros(n, cupy.float32)

    def ours(tol):
        def run():
            residual.fill(0)
            gsparse.select_topk(accrued, frac, residual, tolerance=tol)
        return run

    def by_partition():
        residual.fill(0)
        v = residual
        v += accrued
        idx = cupy.argpartition(cupy.abs(v), n - k)[n - k:]
        idx.sort()
        values = v[idx]
        v[idx] = 0
        return idx, values

    def by_sort():
        residual.fill(0)
        v = residual
        v += accrued
        idx = cupy.argsort(cupy.abs(v))[n - k:]
        idx.sort()
        values = v[idx]
        v[idx] = 0
        return idx, values

    t_exact = median_ms(ours(0.0), sync, args.repeats)
    t_tol = median_ms(ours(0.05), sync, args.repeats)
    t_part = median_ms(by_partition, sync, args.repeats)
    t_sort = median_ms(by_sort, sync, args.repeats)
    print(f"  asyncsgd exact k      {t_exact:8.3f}")
    print(f"  asyncsgd tolerance 5% {t_tol:8.3f}")
    print(f"  cupy.argpartition     {t_part:8.3f}   ratio asyncsgd/argpartition {t_exact / t_part:5.2f}")
    print(f"  cupy.argsort          {t_sort:8.3f}   ratio asyncsgd/argsort      {t_exact / t_sort:5.2f}")
    return {"n": n, "fraction": frac, "k": k, "exact_ms": t_exact, "tolerance_ms": t_tol, "partition_ms": t_part,
            "sort_ms": t_sort, "speedup_vs_sort": t_sort / t_exact, "speedup_vs_partition": t_part / t_exact}


def bench_worker_step(cupy, args):
    from asyncsgd.backends import sparse as cpu_sparse
    from asyncsgd.backends import cuda_sparse as gsparse
    from asyncsgd.model import build_model
    print(f"3. Downpour worker step: speech_cnn loss_and_grad (batch {args.batch}) + top-k {args.fraction} "
          f"+ pairs to host (ms)")
    rng = numpy.random.default_rng(0)
    cpu = build_model("speech_cnn", seed=0)
    gpu = build_model("speech_cnn", seed=0, xp=cupy)
    x = rng.standard_normal((args.batch,) + cpu.input_shape).astype(numpy.float32)
    y = rng.integers(0, 10, args.batch)
    xd, yd = cupy.asarray(x), cupy.asarray(y)
    res_cpu = numpy.zeros(cpu.n_params, numpy.float32)
    res_gpu = cupy.zeros(gpu.n_params, cupy.float32)
    drop = numpy.random.default_rng(1)

    def cpu_step():
        cpu.loss_and_grad(x, y, rng=drop)
        cpu_sparse.select_topk(cpu.grads, args.fraction, res_cpu)

    def gpu_step():
        gpu.loss_and_grad(xd, yd, rng=drop)
        idx, values = gsparse.select_topk(gpu.grads, args.fraction, res_gpu)
        idx.get(), values.get()

    t_cpu = median_ms(cpu_step, lambda: None, max(3, args.repeats // 4))
    t_gpu = median_ms(gpu_step, cupy.cuda.get_current_stream().synchronize, args.repeats)
    print(f"  numpy CPU {t_cpu:9.3f}   GPU {t_gpu:8.3f}   speed-up CPU/GPU {t_cpu / t_gpu:6.1f}x "
          f"({cpu.n_params:,} parameters)")
    return {"batch": args.batch, "fraction": args.fraction, "n_params": int(cpu.n_params), "cpu_ms": t_cpu,
            "gpu_ms": t_gpu, "speedup": t_cpu / t_gpu}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32, help="mini-batch size (default 32)")
    parser.add_argument("--n", type=int, default=10_000_000, help="vector length for the selection (default 10M)")
    parser.add_argument("--fraction", type=float, default=0.01, help="pushed fraction (default 0.01)")
    parser.add_argument("--repeats", type=int, default=20, help="timed repetitions per case (default 20)")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    if backend.gpu_count() == 0:
        why = "CuPy is not installed" if not backend.cupy_importable() else "CuPy finds no usable CUDA device"
        print(f"bench_gpu: needs a CUDA GPU, but {why}; nothing measured. Run it on a GPU node "
              f"(pip install 'asyncsgd[gpu]').", file=sys.stderr)
        return 2
    cupy = backend.import_cupy()
    dev = cupy.cuda.Device()
    name = cupy.cuda.runtime.getDeviceProperties(dev.id)["name"].decode()
    print(f"device {dev.id}: {name}; CuPy {cupy.__version__}")
    record = {"device": name, "cupy": cupy.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    # Each part is written as soon as it is measured, so a run cut short keeps what it had.
    for key, part in (("conv", bench_conv), ("select", bench_select), ("worker_step", bench_worker_step)):
        record[key] = part(cupy, args)
        if args.json:
            with open(args.json + ".tmp", "w") as f:
                json.dump(record, f, indent=1)
            os.replace(args.json + ".tmp", args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
