"""How asyncsgd splits ``range(n)`` among parts: one helper for parameter shards, workers' rows and mini-shards.

Two layouts, both balanced (part sizes differ by at most one, the first ``n % parts`` parts holding the extra one):

- ``contiguous_bounds(n, parts)``: consecutive ``(start, stop)`` ranges.  Parameter shards use it (each server
  holds one contiguous piece of the flat vector, so a fetch or a push moves one buffer per shard), and so do the
  L-BFGS vector shards.
- ``strided_rows(n, part, parts)``: rows ``part, part + parts, part + 2*parts, ...``.  Training rows use it: a
  file written in class order (all the 0s, then all the 1s, ...) would give each contiguous slice one or two
  classes, and a worker that sees two classes trains a model that predicts two classes; every stride instead meets
  every class in proportion whatever the file order.  h5py reads a stride as one hyperslab selection
  (``ds[part::parts]``), so a worker still reads only its own rows.
- ``strided_order(n, parts)``: the permutation that lays the strided parts end to end, so that contiguous bounds
  of the permuted rows are strided parts of the original ones (Sandblaster mini-shards, which are handed out as
  ``(start, stop)`` ranges of a batch's rows).
"""
from __future__ import annotations

import numbers

import numpy

__all__ = ["contiguous_bounds", "part_size", "strided_rows", "strided_order"]


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


def strided_rows(n: int, part: int, parts: int, *, what: str = "rows") -> slice:
    """Return the slice ``part::parts`` of ``range(n)``: part ``part``'s share, every class of a sorted file.

    A slice rather than an index array: numpy views it without a copy and h5py reads it as one hyperslab.
    """
    n, parts = _check(n, parts, what)
    part = _count(part, "part", 0)
    if part >= parts:
        raise ValueError(f"part must be in [0, {parts}), got {part}")
    return slice(part, n, parts)


def strided_order(n: int, parts: int, *, what: str = "rows") -> numpy.ndarray:
    """Return int64 [n]: strided part 0, then part 1, ...; ``contiguous_bounds(n, parts)`` cut it into the parts."""
    n, parts = _check(n, parts, what)
    return numpy.concatenate([numpy.arange(part, n, parts, dtype=numpy.int64) for part in range(parts)])
