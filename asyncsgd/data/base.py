"""The interface every data source has: metadata, each worker's class-strided share, and the test set.

Features come back as float32 numpy arrays [N, C, H, W] whatever the storage dtype, labels as int64 [N].
Worker ``w`` of ``W`` trains on its class-strided share (``asyncsgd.data.partition.class_strided_rows``; why in
``asyncsgd.data.source``).
"""
from __future__ import annotations

import numpy as np

from asyncsgd.data.partition import class_strided_rows
from asyncsgd.runtime.faults import fault_point

__all__ = ["DataSource"]

# Rows read at a time while a worker picks its rows out of the training split: bounds the memory.
_STRIDE_BLOCK_ROWS = 2048


class DataSource:
    """Base of every source: metadata plus train_slice / train_range / test_set returning float32 numpy arrays.

    Subclasses set name, input_shape (C, H, W), n_classes, n_train, n_test, attrs and implement
    ``_read_train(start, stop)`` and ``_read_test()``.
    """
    name: str
    input_shape: tuple
    n_classes: int
    n_train: int
    n_test: int
    attrs: dict

    def train_slice(self, part: int, n_parts: int):
        """Return (x float32 [n, C, H, W], y int64 [n]): worker ``part``'s class-strided share of the training rows.

        The n_parts shares are disjoint, cover every row, and differ in size by at most one; each holds every class
        in proportion (to within one row per class) whatever the file's row order.  Rows keep the file's order.
        """
        fault_point("data")
        if not (isinstance(n_parts, (int, np.integer)) and n_parts >= 1):
            raise ValueError(f"n_parts must be a positive integer, got {n_parts!r}")
        if n_parts > self.n_train:
            raise ValueError(f"cannot split {self.n_train} training rows among {n_parts} workers: use fewer workers "
                             f"or more data")
        if not (isinstance(part, (int, np.integer)) and 0 <= part < n_parts):
            raise ValueError(f"part must be in [0, {n_parts}), got {part!r}")
        return self._read_train_rows(class_strided_rows(self.train_labels(), int(part), int(n_parts)))

    def train_rows(self, rows):
        """Return (x float32, y int64) of training rows ``rows`` (file indices, ascending, unique), reading only
        the blocks that hold them (the validation split's rows, a worker's share of the training rows)."""
        fault_point("data")
        rows = np.asarray(rows, dtype=np.int64)
        if rows.ndim != 1 or rows.size == 0 or np.any(np.diff(rows) <= 0):
            raise ValueError("rows must be a non-empty 1-D array of ascending, unique training row indices")
        if rows[0] < 0 or rows[-1] >= self.n_train:
            raise ValueError(f"training rows must lie in [0, {self.n_train}), got {int(rows[0])}..{int(rows[-1])}")
        return self._read_train_rows(rows)

    def train_labels(self):
        """Return every training label (int64 [n_train]), reading no features where the storage allows."""
        return np.concatenate([self._read_train(lo, min(lo + _STRIDE_BLOCK_ROWS, self.n_train))[1]
                               for lo in range(0, self.n_train, _STRIDE_BLOCK_ROWS)])

    def train_range(self, start: int, stop: int):
        """Return (x float32, y int64) for training rows [start, stop) (Sandblaster mini-shards), reading only those."""
        fault_point("data")
        if not 0 <= start < stop <= self.n_train:
            raise ValueError(f"training row range [{start}, {stop}) is empty or outside [0, {self.n_train})")
        return self._read_train(int(start), int(stop))

    def test_set(self):
        """Return the whole test split (x float32 [M, C, H, W], y int64 [M])."""
        fault_point("data")
        return self._read_test()

    def describe(self) -> str:
        """Return a one-line description: name, sizes, input shape."""
        c, h, w = self.input_shape
        return (f"{self.name}: {self.n_train} train / {self.n_test} test examples, input {c}x{h}x{w}, "
                f"{self.n_classes} classes")

    def _read_train(self, start, stop):
        raise NotImplementedError

    def _read_train_rows(self, rows):
        """Return the training rows ``rows`` (int64, ascending), reading contiguous blocks and keeping those rows."""
        xs, ys = [], []
        for lo in range(0, self.n_train, _STRIDE_BLOCK_ROWS):
            hi = min(lo + _STRIDE_BLOCK_ROWS, self.n_train)
            a, b = np.searchsorted(rows, [lo, hi])
            if b == a:
                continue
            x, y = self._read_train(lo, hi)
            if b - a < hi - lo:
                keep = rows[a:b] - lo
                x, y = x[keep], y[keep]  # copies: the block itself is dropped
            xs.append(x)
            ys.append(y)
        return np.concatenate(xs), np.concatenate(ys)

    def _read_test(self):
        raise NotImplementedError
