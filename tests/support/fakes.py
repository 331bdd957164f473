"""Stand-in objects that several test files share."""
from __future__ import annotations

import numpy as np

__all__ = ["IntegerNet"]


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
