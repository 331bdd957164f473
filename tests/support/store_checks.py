"""A check of what a fetch returns while other ranks push: a read that mixes versions fails it.

Tests that push concurrently make every push add exactly 1 at the elements ``COUNTERS`` (and anything elsewhere).
A fetch that returned ``version`` (pushes landed before its reads began) with ``fetch_overlap`` (pushes that had
started by the time its reads ended and were not counted in ``version``) must then hold, at every counter element,
``initial + c`` with ``version <= c <= version + overlap``: every landed push wholly, no push that had not started.
A read that mixes an older copy of some elements with a newer one (a torn read), a lost update or a value that
cannot be there fails it, where "every value is a whole number" passes any of them (integer sums stay integers).
"""
from __future__ import annotations

import numpy as np

__all__ = ["COUNTERS", "read_faults"]

COUNTERS = slice(0, None, 2)   # every other element counts the pushes; the others carry arbitrary integer deltas


def read_faults(out, initial, version: int, overlap: int, counters=COUNTERS) -> list:
    """Return what is wrong with fetched ``out`` (empty when nothing): see the module."""
    faults = []
    if not np.array_equal(out, np.round(out)):
        faults.append(f"values that are not whole numbers: {out[out != np.round(out)][:5]}")
    seen = out[counters].astype(np.float64) - np.asarray(initial, np.float64)[counters]
    low, high = version, version + overlap
    wrong = np.flatnonzero((seen < low) | (seen > high))
    if wrong.size:
        faults.append(f"counter elements {wrong[:5].tolist()} hold {seen[wrong[:5]].tolist()} pushes, outside "
                      f"[{low}, {high}] (version {version}, overlap {overlap}): a read that mixes versions")
    return faults
