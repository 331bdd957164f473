"""How asyncsgd splits ``range(n)`` among parts: one helper for parameter shards, workers' rows and mini-shards.

Two layouts, both balanced (part sizes differ by at most one, the first ``n % parts`` parts holding the extra one):

- ``contiguous_bounds(n, parts)``: consecutive ``(start, stop)`` ranges.  Parameter shards use it (each server
  holds one contiguous piece of the flat vector, so a fetch or a push moves one buffer per shard), and so do the
  L-BFGS vector shards and the static mini-shard schedule.
- ``class_strided_rows(labels, part, parts)``: rows sorted by class and dealt round-robin, so every part holds
  every class in proportion (to within one row per class) whatever the order of the file.  Training rows use it:
  a file written in class order (all the 0s, then all the 1s, ...) would give each contiguous slice one or two
  classes, and every replica would learn a different few-class problem.  On a sorted file it is the plain stride
  ``part::parts``; on a shuffled one it is exact where a plain stride is only balanced on average.
- ``class_strided_order(labels, parts)``: the same parts laid end to end, so that ``contiguous_bounds`` of the
  reordered rows are the parts (Sandblaster mini-shards, handed out as ``(start, stop)`` ranges of a batch).
"""
from __future__ import annotations

import numbers

import numpy

__all__ = ["contiguous_bounds", "part_size", "class_strided_order", "class_strided_rows"]


def _count(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


def _check(n, parts, what: str, allow_empty: bool = False):
    n = _count(n, "n", 0)
    parts = _count(parts, "parts", 1)
    if parts > n and not allow_empty:
        raise ValueError(f"cannot split {n} {what} into {parts} parts: use at most {n} parts or more {what}")
    return n, parts


def _labels(labels) -> numpy.ndarray:
    labels = numpy.asarray(labels)
    if labels.ndim != 1 or labels.dtype.kind not in "iub":
        raise ValueError(f"labels must be a 1-D integer array (one class per row), got {labels.dtype} of shape "
                         f"{labels.shape}")
    return labels


def part_size(n: int, part: int, parts: int) -> int:
    """Return the size of part ``part`` of ``parts`` balanced parts of ``n`` items (both layouts agree)."""
    base, extra = divmod(n, parts)
    return base + (1 if part < extra else 0)


def contiguous_bounds(n: int, parts: int, *, what: str = "items", allow_empty: bool = False) -> tuple:
    """Return ``((start, stop), ...)``: ``parts`` consecutive ranges covering ``range(n)``, sizes differing by <= 1.

    Fewer items than parts is an error naming ``what``, unless ``allow_empty`` (then the last parts are empty:
    the L-BFGS shards of a tiny vector, a test set smaller than the job).
    """
    n, parts = _check(n, parts, what, allow_empty)
    bounds, start = [], 0
    for part in range(parts):
        stop = start + part_size(n, part, parts)
        bounds.append((start, stop))
        start = stop
    return tuple(bounds)


def class_strided_order(labels, parts: int, *, what: str = "rows") -> numpy.ndarray:
    """Return int64 [n]: the rows of part 0, then of part 1, ..., each part's rows ascending.

    ``labels`` (int [n]) are the rows' classes (all equal: a plain stride ``part::parts``).  Rows are ordered by
    class (stably) and dealt round-robin to the parts, so every part holds ``n_c / parts`` rows of class
    c to within one, and part sizes are ``part_size(n, part, parts)``: ``contiguous_bounds(n, parts)`` cut the
    result into the parts.
    """
    labels = _labels(labels)
    _, parts = _check(labels.size, parts, what)
    by_class = numpy.argsort(labels, kind="stable")
    return numpy.concatenate([numpy.sort(by_class[part::parts]) for part in range(parts)]).astype(numpy.int64)


def class_strided_rows(labels, part: int, parts: int, *, what: str = "rows") -> numpy.ndarray:
    """Return part ``part``'s rows of ``class_strided_order(labels, parts)`` (int64, ascending)."""
    labels = _labels(labels)
    _, parts = _check(labels.size, parts, what)
    part = _count(part, "part", 0)
    if part >= parts:
        raise ValueError(f"part must be in [0, {parts}), got {part}")
    return numpy.sort(numpy.argsort(labels, kind="stable")[part::parts]).astype(numpy.int64)
