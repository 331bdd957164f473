"""Forward+backward throughput of speech_cnn: asyncsgd's numpy layers against PyTorch CPU on the identical network.

    python benchmarks/bench_conv.py [--batch 64] [--threads 1 2] [--rounds 7] [--seconds 0.6]

Each thread count runs in its own subprocess with OMP_NUM_THREADS / OPENBLAS_NUM_THREADS / MKL_NUM_THREADS set (the
BLAS thread pools read them at import) and torch.set_num_threads; inside it the two frameworks are timed in
alternating rounds and the best round counts, so load from other processes on the machine hurts both alike.
asyncsgd's NumpyOps reads the same variables: at n threads each convolution runs its batch in n parts at once, each
part's GEMMs on one BLAS thread (asyncsgd/backends/threads.py); the "parts" column shows the count it used.
Prints samples/s and the ratio asyncsgd/torch per thread count, and the fraction of numpy's own float32 GEMM FLOP/s
(a GEMM of the conv2 forward's shape) that asyncsgd's two convolutions (forward + backward) reach.  The "C" column
says whether asyncsgd ran its compiled CPU kernels (asyncsgd/backends/cpu_kernels.py); "numpy/s" is the same network
with them off (pure numpy), timed in the same rounds.  The kernels are built by pip install; in a source checkout
run ``python setup.py build_ext --inplace`` first, or the benchmark measures the numpy path only.
PyTorch is needed only here: pip install torch.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import record  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def torch_network(torch, input_shape, n_classes):
    """Return the torch.nn twin of asyncsgd's speech_cnn (same layers, same order, same shapes)."""
    nn = torch.nn
    c, h, w = input_shape
    return nn.Sequential(
        nn.Conv2d(c, 16, 5, padding=2), nn.MaxPool2d(2), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1), nn.MaxPool2d(2), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * (h // 4) * (w // 4), 128), nn.ReLU(), nn.Dropout(0.25),
        nn.Linear(128, n_classes))


def check_same_function(torch, net, tnet, x, y):
    """Copy asyncsgd's parameters into the torch twin; exit unless logits, loss and gradients agree (eval mode)."""
    import numpy as np
    linear = [m for m in tnet if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear))]
    with torch.no_grad():
        for module, layer in zip(linear, [layer for layer in net.layers if layer.params]):
            w = layer.params["w"] if layer.kind == "conv" else layer.params["w"].T   # Dense keeps w as (D, K)
            module.weight.copy_(torch.from_numpy(np.ascontiguousarray(w)))
            module.bias.copy_(torch.from_numpy(layer.params["b"]))
    tnet.eval()
    ours = net.forward(x)
    theirs = tnet(torch.from_numpy(x))
    loss = torch.nn.functional.cross_entropy(theirs, torch.from_numpy(y))
    tnet.zero_grad()
    loss.backward()
    dropout_off = [layer for layer in net.layers if layer.kind == "dropout"]
    for layer in dropout_off:
        layer.rate, saved = 0.0, layer.rate
    our_loss = net.loss_and_grad(x, y)
    for layer in dropout_off:
        layer.rate = saved
    parts = []
    for m in linear:
        wg = m.weight.grad.numpy()
        parts += [(wg.T if isinstance(m, torch.nn.Linear) else wg).ravel(), m.bias.grad.numpy()]
    grad = np.concatenate(parts)
    err_logits = np.abs(ours - theirs.detach().numpy()).max()
    err_grad = np.abs(net.grads - grad).max() / np.abs(grad).max()
    if err_logits > 1e-3 or abs(our_loss - loss.item()) > 1e-4 or err_grad > 1e-3:
        sys.exit(f"asyncsgd and torch networks differ: logits {err_logits:.2e}, loss {our_loss} vs {loss.item()}, "
                 f"gradients {err_grad:.2e}")


def best_rate(step, batch, rounds, seconds, others=()):
    """Time ``step`` in ``rounds`` rounds of about ``seconds`` each; return the best samples/s.

    ``others`` are (step, results-list) pairs timed in the same rounds, interleaved, so every framework sees the same
    machine load.
    """
    jobs = [(step, [])] + list(others)
    for fn, _ in jobs:                       # warm up: buffers, thread pools, caches
        for _ in range(3):
            fn()
    for _ in range(rounds):
        for fn, rates in jobs:
            n, t0 = 0, time.perf_counter()
            while True:
                fn()
                n += 1
                dt = time.perf_counter() - t0
                if dt >= seconds:
                    break
            rates.append(n * batch / dt)
    return [max(rates) for _, rates in jobs]


def conv_flops(net, batch):
    """Return FLOPs of every conv layer's forward + backward (weight grads; input grads except for the first)."""
    total, shape = 0, net.input_shape
    for i, layer in enumerate(net.layers):
        out = layer.output_shape(shape)
        if layer.kind == "conv":
            macs = batch * out[1] * out[2] * out[0] * shape[0] * layer.kh * layer.kw
            passes = 3 if i > net._first_param_layer else 2
            total += 2 * macs * passes
        shape = out
    return total


def worker(args):
    import numpy as np
    import torch
    sys.path.insert(0, ROOT)
    from asyncsgd.model import NumpyOps, build_model

    torch.set_num_threads(args.threads)
    shape = (1, 40, args.frames)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.batch,) + shape).astype(np.float32)
    y = rng.integers(0, 10, args.batch)
    net = build_model("speech_cnn", shape, 10, seed=0)
    plain = build_model("speech_cnn", shape, 10, seed=0, ops=NumpyOps(cpu_kernels_on=False))
    drop_rng = np.random.default_rng(1)

    def ours():
        net.loss_and_grad(x, y, rng=drop_rng)

    def numpy_only():
        plain.loss_and_grad(x, y, rng=drop_rng)

    tnet = torch_network(torch, shape, 10)
    check_same_function(torch, net, tnet, x, y)
    tnet.train()
    tx, ty = torch.from_numpy(x), torch.from_numpy(y)
    loss_fn = torch.nn.CrossEntropyLoss()

    def theirs():
        tnet.zero_grad(set_to_none=False)
        loss_fn(tnet(tx), ty).backward()

    # The convolutions alone (same layer objects, same batch) and a GEMM of conv2's forward shape.
    convs = [(i, layer) for i, layer in enumerate(net.layers) if layer.kind == "conv"]
    inputs, h = {}, net.ops.nchw_to_cnhw(x)
    for i, layer in enumerate(net.layers):
        if layer.kind == "conv":
            inputs[i] = h.copy()
        h = layer.forward(h, False, None)

    def conv_only():
        for i, layer in convs:
            out = layer.forward(inputs[i], True, None)
            layer.backward(out, need_dx=i > net._first_param_layer)

    k = 16 * 9
    a = rng.standard_normal((32, k + 1)).astype(np.float32)
    b = rng.standard_normal((k + 1, args.batch * 20 * (args.frames // 2))).astype(np.float32)
    c = np.empty((32, b.shape[1]), np.float32)

    def gemm():
        np.matmul(a, b, out=c)

    rate_ours, rate_torch, rate_numpy = best_rate(ours, args.batch, args.rounds, args.seconds,
                                                  others=[(theirs, []), (numpy_only, [])])
    rate_conv, rate_gemm = best_rate(conv_only, args.batch, args.rounds, args.seconds / 2, others=[(gemm, [])])
    gemm_flops = 2 * a.shape[0] * a.shape[1] * b.shape[1] * rate_gemm / args.batch
    conv_flops_s = conv_flops(net, args.batch) * rate_conv / args.batch
    print(json.dumps({"threads": args.threads, "parts": net.ops.threads, "ours": rate_ours, "torch": rate_torch,
                      "numpy": rate_numpy, "cpu_kernels": net.ops.cpu_kernels_on,
                      "torch_version": torch.__version__,
                      "conv_gflops": conv_flops_s / 1e9, "gemm_gflops": gemm_flops / 1e9}))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--frames", type=int, default=64, help="time frames of the (1, 40, T) input")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seconds", type=float, default=0.6, help="length of one timing round")
    ap.add_argument("--json-out", help="write every thread count's figures here (docs/BENCHMARKS.md)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        args.threads = args.threads[0]
        worker(args)
        return
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit("bench_conv.py needs PyTorch for the comparison: pip install torch (CPU build is enough)")

    rows, load_before = [], os.getloadavg()[0]
    for n in args.threads:
        env = dict(os.environ, OMP_NUM_THREADS=str(n), OPENBLAS_NUM_THREADS=str(n), MKL_NUM_THREADS=str(n))
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--threads", str(n), "--batch", str(args.batch),
               "--frames", str(args.frames), "--rounds", str(args.rounds), "--seconds", str(args.seconds)]
        out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if out.returncode != 0:
            sys.exit(f"benchmark worker for {n} thread(s) failed:\n{out.stderr}")
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))

    print(f"speech_cnn (1, 40, {args.frames}), batch {args.batch}, float32, forward+backward, best of "
          f"{args.rounds} rounds; torch {rows[0]['torch_version']} twin checked identical (logits, loss, gradients)")
    print(f"machine: {os.cpu_count()} CPUs, 1-min load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} "
          f"after (timings are only meaningful when it is below the CPU count)")
    print(f"{'threads':>7} {'parts':>5} {'C':>3} {'asyncsgd/s':>11} {'torch/s':>9} {'ratio':>6} {'numpy/s':>8} "
          f"{'C/numpy':>7} {'conv GF/s':>10} {'gemm GF/s':>10} {'conv/gemm':>9}")
    for r in rows:
        print(f"{r['threads']:>7} {r['parts']:>5} {'yes' if r['cpu_kernels'] else 'no':>3} {r['ours']:>11.0f} "
              f"{r['torch']:>9.0f} {r['ours'] / r['torch']:>6.2f} {r['numpy']:>8.0f} {r['ours'] / r['numpy']:>7.2f} "
              f"{r['conv_gflops']:>10.1f} {r['gemm_gflops']:>10.1f} {r['conv_gflops'] / r['gemm_gflops']:>9.2f}")
    record.write(args.json_out, [{**r, "ratio": r["ours"] / r["torch"]} for r in rows],
                 started_load=[load_before])


if __name__ == "__main__":
    main()
