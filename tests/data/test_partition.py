"""asyncsgd.data.partition: the one helper behind parameter shards, workers' training rows and mini-shards."""
import numpy as np
import pytest

from asyncsgd.algorithms.sandblaster.lbfgs import shard_bounds as lbfgs_bounds
from asyncsgd.algorithms.sandblaster.minishards import mini_shard_bounds, mini_shard_rows
from asyncsgd.data.partition import class_strided_order, class_strided_rows, contiguous_bounds, part_size
from asyncsgd.store import shard_bounds


@pytest.mark.parametrize("n,parts", [(1, 1), (10, 3), (31, 3), (7, 7), (100003, 6), (2700, 5)])
def test_contiguous_bounds_cover_and_balance(n, parts):
    bounds = contiguous_bounds(n, parts)
    assert bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    assert [b - a for a, b in bounds] == [part_size(n, p, parts) for p in range(parts)]
    assert max(b - a for a, b in bounds) - min(b - a for a, b in bounds) <= 1
    # the store and L-BFGS splitters are this helper
    assert shard_bounds(n, parts) == bounds and tuple(lbfgs_bounds(n, parts)) == bounds


def test_contiguous_bounds_errors_and_empty_parts():
    with pytest.raises(ValueError, match="cannot split 3 parameters into 4 parts"):
        contiguous_bounds(3, 4, what="parameters")
    with pytest.raises(ValueError, match="parts must be >= 1"):
        contiguous_bounds(3, 0)
    with pytest.raises(ValueError, match="n must be an integer"):
        contiguous_bounds(3.0, 1)
    assert contiguous_bounds(2, 4, allow_empty=True) == ((0, 1), (1, 2), (2, 2), (2, 2))


@pytest.mark.parametrize("order", ["sorted", "grouped", "shuffled", "balanced"])
@pytest.mark.parametrize("parts", [1, 3, 5, 6, 7])
def test_class_strided_parts_hold_every_class_whatever_the_order(order, parts):
    rng = np.random.default_rng(parts)
    labels = np.repeat(np.arange(10), rng.integers(40, 60, 10))
    if order == "grouped":
        labels = np.concatenate([labels[labels == c] for c in rng.permutation(10)])
    elif order == "shuffled":
        labels = rng.permutation(labels)
    elif order == "balanced":
        labels = labels[np.argsort(np.arange(labels.size) % 10, kind="stable")]
    n = labels.size
    rows = [class_strided_rows(labels, p, parts) for p in range(parts)]
    assert sorted(np.concatenate(rows).tolist()) == list(range(n))
    assert [r.size for r in rows] == [part_size(n, p, parts) for p in range(parts)]
    total = np.bincount(labels, minlength=10)
    for r in rows:
        assert np.all(np.diff(r) > 0)
        assert np.abs(np.bincount(labels[r], minlength=10) - total / parts).max() < 1
    order_ = class_strided_order(labels, parts)
    for r, (a, b) in zip(rows, contiguous_bounds(n, parts)):
        np.testing.assert_array_equal(order_[a:b], r)


def test_class_strided_rows_of_a_sorted_file_are_the_plain_stride():
    labels = np.repeat(np.arange(4), 25)
    for p in range(3):
        np.testing.assert_array_equal(class_strided_rows(labels, p, 3), np.arange(p, 100, 3))


def test_class_strided_rows_errors():
    with pytest.raises(ValueError, match="part must be in"):
        class_strided_rows(np.zeros(5, int), 3, 3)
    with pytest.raises(ValueError, match="labels must be a 1-D integer array"):
        class_strided_rows(np.zeros(5), 0, 3)
    with pytest.raises(ValueError, match="cannot split 2 rows into 3 parts"):
        class_strided_rows(np.zeros(2, int), 0, 3)


def test_mini_shards_of_a_sorted_batch_hold_every_class():
    """A batch in class order cut into mini-shards: each holds every class (consecutive rows held one)."""
    labels = np.repeat(np.arange(10), 30)                # 300 rows, all 0s then all 1s ...
    rows = np.arange(300)
    reordered, bounds = mini_shard_rows(rows, 30, labels[rows])
    assert bounds == mini_shard_bounds(300, 30) and len(bounds) == 10
    assert sorted(reordered.tolist()) == list(range(300))
    for a, b in bounds:
        assert np.bincount(labels[reordered[a:b]], minlength=10).tolist() == [3] * 10
    plain, _ = mini_shard_rows(rows, 30)                 # without labels: mini-shard i is rows[i::10]
    np.testing.assert_array_equal(plain[:30], np.arange(0, 300, 10))


def test_mini_shard_bounds_are_balanced_and_no_larger_than_asked():
    bounds = mini_shard_bounds(103, 10)
    sizes = [b - a for a, b in bounds]
    assert len(bounds) == 11 and max(sizes) <= 10 and max(sizes) - min(sizes) <= 1 and sum(sizes) == 103
