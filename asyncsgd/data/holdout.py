"""A class-balanced validation split of the training set (``--validation F``), and reading the rows it leaves.

The test set is only reported; the validation rows, held out of the training set, are what a run chooses with
(the best model, ``--target-accuracy``, early stopping).  :func:`split_holdout` picks, in each class of ``n_c``
training rows, ``round(F * n_c)`` rows (rounded half up; at least 1 when F > 0; never the class's last training
row), so every class is represented in proportion whatever the file's order.

Which rows: row i of class c is held out when its rank among class c's rows (in file order) is one of the ranks a
generator seeded with (seed, c) draws.  The choice therefore depends only on each row's class and its rank within
the class, not on how the classes interleave: a file sorted by label and the same file shuffled (keeping each
class's internal order) hold out the same examples.  Every rank computes the split itself from the labels, so no
communication is needed and a resumed run (same seed) gets the same split.

Default fraction, 0.1: on the bundled FSDD features (2,700 training rows, 270 per class, 300 test rows) it holds out
27 rows per class, 270 in all, a validation set the size of the test set, so the figure a run chooses with is as
precise as the one it reports (standard error about 0.007 at 98.5% accuracy), at the cost of a tenth of the
training data.  A smaller fraction makes the choice noisier than the spread the acceptance allows (0.01); a larger
one costs training rows the 30-epoch default needs.

Workers: :func:`partition_rows` splits the training rows (sorted) into near-equal contiguous runs, one per worker,
disjoint and covering; :func:`read_rows` reads a run with ``DataSource.train_range`` over the file range that covers
it (so a worker still reads only its part of the file, plus the few validation rows inside it) and drops the rows
it was not given.
"""
from __future__ import annotations

import math
import numbers

import numpy as np

from asyncsgd.data.partition import contiguous_bounds

__all__ = ["DEFAULT_VALIDATION_FRACTION", "split_holdout", "partition_rows", "read_rows", "read_train_labels",
           "class_counts"]

DEFAULT_VALIDATION_FRACTION = 0.1
_SPLIT_STREAM = 4000   # keeps the split's generators apart from the streams seeded with seed + 1000/2000/3000
_READ_BLOCK = 4096     # rows per read: bounds the memory of reading scattered rows


def _check_fraction(fraction) -> float:
    if isinstance(fraction, bool) or not isinstance(fraction, numbers.Real) or math.isnan(fraction):
        raise ValueError(f"validation fraction must be a number in [0, 1), got {fraction!r}")
    f = float(fraction)
    if not 0 <= f < 1:
        raise ValueError(f"validation fraction must be in [0, 1) (0 = no validation split), got {fraction!r}; "
                         f"e.g. --validation {DEFAULT_VALIDATION_FRACTION}")
    return f


def _check_labels(labels) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"labels must be a 1-D array of class indices, got shape {y.shape}")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"labels must be integers (int64 class indices), got dtype {y.dtype}")
    if y.size and y.min() < 0:
        raise ValueError(f"labels must be >= 0, got {int(y.min())}")
    return y.astype(np.int64, copy=False)


def class_counts(fraction: float, counts) -> np.ndarray:
    """Return how many rows of each class (``counts[c]`` rows) go to validation at ``fraction``."""
    f = _check_fraction(fraction)
    counts = np.asarray(counts, dtype=np.int64)
    k = np.floor(f * counts + 0.5).astype(np.int64)          # round half up (Python's round() halves to even)
    if f > 0:
        k = np.maximum(k, 1)
    # a class keeps at least one training row (a class of one row stays in training)
    return np.minimum(k, np.maximum(counts - 1, 0))


def split_holdout(labels, fraction: float = DEFAULT_VALIDATION_FRACTION, seed: int = 0):
    """Return (train_rows, validation_rows): sorted int64 row indices, disjoint, together every row of ``labels``.

    ``labels`` are the training labels (int64 [N], in file order); ``fraction`` in [0, 1) (0: no validation rows);
    ``seed`` a non-negative integer (the run's ``--seed``).  Deterministic from (labels, fraction, seed).
    """
    y = _check_labels(labels)
    f = _check_fraction(fraction)
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ValueError(f"seed must be an integer >= 0, got {seed!r}")
    counts = np.bincount(y) if y.size else np.zeros(0, dtype=np.int64)
    take = class_counts(f, counts)
    held = np.zeros(y.size, dtype=bool)
    for c in np.flatnonzero(take):
        rows = np.flatnonzero(y == c)                        # class c's rows in file order
        rng = np.random.default_rng(np.random.SeedSequence([int(seed), _SPLIT_STREAM, int(c)]))
        held[rows[rng.permutation(rows.size)[:take[c]]]] = True
    return np.flatnonzero(~held).astype(np.int64), np.flatnonzero(held).astype(np.int64)


def partition_rows(rows, part: int, n_parts: int, *, strided: bool = False) -> np.ndarray:
    """Return worker ``part``'s share of ``rows`` (sorted indices): disjoint, covering, sizes within one.

    Contiguous runs by default (each worker reads one stretch of the file: right for the pre-shuffled files the
    converters write); ``strided=True`` gives worker w rows[w::n_parts], class-balanced even when the file is
    sorted by label, at the price of every worker reading blocks across the whole file.
    """
    rows = np.asarray(rows, dtype=np.int64)
    bounds = contiguous_bounds(rows.size, n_parts, what="training rows")   # validates n_parts
    if isinstance(part, bool) or not isinstance(part, numbers.Integral) or not 0 <= part < n_parts:
        raise ValueError(f"part must be in [0, {n_parts}), got {part!r}")
    start, stop = bounds[part]
    if strided:
        return rows[part::n_parts]
    return rows[start:stop]


def read_rows(src, rows, *, block: int = _READ_BLOCK):
    """Return (x float32, y int64) of training rows ``rows`` (sorted, unique) of DataSource ``src``, in that order.

    Reads with ``src.train_range`` only blocks of at most ``block`` rows that hold a wanted row, so a contiguous
    run of rows costs one pass over its range and scattered rows cost at most one pass over the file.
    """
    rows = np.asarray(rows, dtype=np.int64)
    if rows.ndim != 1 or rows.size == 0:
        raise ValueError("rows must be a non-empty 1-D array of training row indices")
    if np.any(np.diff(rows) <= 0):
        raise ValueError("rows must be sorted and unique")
    if rows[0] < 0 or rows[-1] >= src.n_train:
        raise ValueError(f"rows must lie in [0, {src.n_train}), got {int(rows[0])}..{int(rows[-1])}")
    if isinstance(block, bool) or not isinstance(block, numbers.Integral) or block < 1:
        raise ValueError(f"block must be a positive integer, got {block!r}")
    xs, ys = [], []
    i = 0
    while i < rows.size:
        start = int(rows[i])
        stop = min(start + int(block), src.n_train)
        j = int(np.searchsorted(rows, stop))             # rows[i:j] lie in [start, stop)
        stop = int(rows[j - 1]) + 1                      # read no further than the last wanted row
        x, y = src.train_range(start, stop)
        local = rows[i:j] - start
        xs.append(x[local])
        ys.append(y[local])
        i = j
    return np.concatenate(xs), np.concatenate(ys)


def read_train_labels(src, *, block: int = _READ_BLOCK) -> np.ndarray:
    """Return every training label of ``src`` (int64 [n_train]).

    Uses ``src.train_labels()`` when the source has it (an HDF5 source can read /train/y alone); otherwise reads
    the training rows block by block and keeps only the labels.
    """
    if hasattr(src, "train_labels"):
        return np.asarray(src.train_labels(), dtype=np.int64)
    out = np.empty(src.n_train, dtype=np.int64)
    for start in range(0, src.n_train, block):
        stop = min(start + block, src.n_train)
        out[start:stop] = src.train_range(start, stop)[1]
    return out
