"""Stand-in objects that several test files share."""
from __future__ import annotations

import numpy as np

__all__ = ["IntegerNet", "train_worker"]


class IntegerNet:
    """A stand-in network whose gradients are small integers drawn from a seed: every update is exact in float32.

    ``total_grad`` sums every gradient it produced (float64), so a test can compare a store with what was pushed.
    """

    def __init__(self, n, seed):
        self.n_params = n
        self.params = np.zeros(n, np.float32)
        self.grads = np.zeros(n, np.float32)
        self.rng = np.random.default_rng(seed)
        self.total_grad = np.zeros(n, np.float64)

    def loss_and_grad(self, xb, yb, rng=None):
        self.grads[...] = self.rng.integers(-3, 4, self.n_params)
        self.total_grad += self.grads
        return 0.0


def train_worker(worker, steps: int, opts) -> None:
    """Drive a DownpourWorker as the worker loop does, without data: fetch every ``n_fetch`` steps, step, push every
    ``n_push`` steps, then the final push (``finish``)."""
    x, y = np.zeros((1, 1)), np.zeros(1, np.int64)
    for _ in range(steps):
        if worker.steps % opts.n_fetch == 0:
            worker.fetch()
        worker.step(x, y)
        worker.steps += 1
        if worker.steps % opts.n_push == 0:
            worker.push()
    worker.finish()

