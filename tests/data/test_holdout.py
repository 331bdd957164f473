"""Tests of asyncsgd.data.holdout: the class-balanced validation split and the rows each worker reads."""
from __future__ import annotations

import numpy as np
import pytest

from asyncsgd.data import open_source
from asyncsgd.data.holdout import (DEFAULT_VALIDATION_FRACTION, class_counts, partition_rows, read_rows,
                                   read_train_labels, split_holdout)


def _labels(counts, seed=0):
    """Shuffled labels with counts[c] rows of class c."""
    y = np.repeat(np.arange(len(counts)), counts).astype(np.int64)
    return np.random.default_rng(seed).permutation(y)


def test_split_is_disjoint_covering_and_sorted():
    y = _labels([50, 30, 20, 7])
    train, val = split_holdout(y, 0.1, seed=3)
    assert train.dtype == np.int64 and val.dtype == np.int64
    assert np.intersect1d(train, val).size == 0
    assert np.array_equal(np.union1d(train, val), np.arange(y.size))
    assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)


def test_each_class_contributes_round_f_times_its_count_and_at_least_one():
    counts = [50, 30, 25, 7, 3]
    y = _labels(counts)
    _, val = split_holdout(y, 0.1, seed=0)
    # 5.0 -> 5, 3.0 -> 3, 2.5 -> 3 (half up), 0.7 -> 1, 0.3 -> 1 (at least one)
    assert np.bincount(y[val], minlength=len(counts)).tolist() == [5, 3, 3, 1, 1]
    assert class_counts(0.1, counts).tolist() == [5, 3, 3, 1, 1]


def test_a_class_keeps_a_training_row():
    y = _labels([40, 1, 2])
    train, val = split_holdout(y, 0.6, seed=0)
    assert np.bincount(y[val], minlength=3).tolist() == [24, 0, 1]
    assert set(y[train].tolist()) == {0, 1, 2}


def test_split_is_deterministic_from_the_seed():
    y = _labels([100] * 10)
    a = split_holdout(y, 0.1, seed=7)
    b = split_holdout(y.copy(), 0.1, seed=7)
    c = split_holdout(y, 0.1, seed=8)
    assert all(np.array_equal(p, q) for p, q in zip(a, b))
    assert not np.array_equal(a[1], c[1]), "another seed holds out other rows"


def test_a_label_sorted_file_gives_a_balanced_validation_set_of_the_same_examples():
    """A file sorted by label (the worst case for 'take the last F of the file') gives the same per-class counts,
    and holds out the same examples: the choice depends on a row's class and rank within its class only."""
    y = _labels([60, 45, 30, 90])
    order = np.argsort(y, kind="stable")              # sorted file: row i of it is row order[i] of the original
    y_sorted = y[order]
    _, val = split_holdout(y, 0.2, seed=5)
    _, val_sorted = split_holdout(y_sorted, 0.2, seed=5)
    assert np.bincount(y_sorted[val_sorted]).tolist() == [12, 9, 6, 18]
    assert np.array_equal(np.sort(order[val_sorted]), val)
    # the validation rows are spread over the sorted file, not its tail
    assert set(y_sorted[val_sorted].tolist()) == {0, 1, 2, 3}


def test_fraction_zero_holds_out_nothing():
    y = _labels([10, 10])
    train, val = split_holdout(y, 0.0, seed=0)
    assert val.size == 0 and np.array_equal(train, np.arange(20))


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, float("nan"), "0.1", None, True])
def test_bad_fraction_is_refused_naming_it(fraction):
    with pytest.raises(ValueError, match="validation fraction must be"):
        split_holdout(_labels([10, 10]), fraction, seed=0)


def test_bad_labels_and_seed_are_refused():
    with pytest.raises(ValueError, match="labels must be a 1-D array"):
        split_holdout(np.zeros((3, 2), dtype=np.int64), 0.1)
    with pytest.raises(ValueError, match="labels must be integers"):
        split_holdout(np.zeros(3, dtype=np.float32), 0.1)
    with pytest.raises(ValueError, match="labels must be >= 0"):
        split_holdout(np.array([0, -1, 2]), 0.1)
    with pytest.raises(ValueError, match="seed must be an integer >= 0"):
        split_holdout(_labels([10]), 0.1, seed=-1)


def test_default_fraction_on_the_bundled_data_matches_the_docstring():
    src = open_source("fsdd")
    y = read_train_labels(src)
    _, val = split_holdout(y, DEFAULT_VALIDATION_FRACTION, seed=0)
    assert val.size == 270 and np.bincount(y[val]).tolist() == [27] * 10


@pytest.fixture(scope="module")
def fsdd():
    src = open_source("fsdd")
    return src, src.train_range(0, src.n_train)


@pytest.mark.parametrize("n_workers", [1, 2, 3, 5])
def test_workers_read_only_training_rows_disjoint_and_covering(fsdd, n_workers):
    """What each worker reads (read_rows of its partition, from the bundled HDF5 file) never includes a validation
    row; the workers' rows are disjoint and cover the training rows; contents are the file's rows."""
    src, (x_all, y_all) = fsdd
    labels = read_train_labels(src)
    assert np.array_equal(labels, y_all)
    train, val = split_holdout(labels, 0.1, seed=2)
    parts = [partition_rows(train, w, n_workers) for w in range(n_workers)]
    assert max(p.size for p in parts) - min(p.size for p in parts) <= 1
    assert np.array_equal(np.concatenate(parts), train)
    for rows in parts:
        assert np.intersect1d(rows, val).size == 0
        x, y = read_rows(src, rows, block=377)       # a block size that cuts runs at odd places
        assert np.array_equal(x, x_all[rows]) and np.array_equal(y, y_all[rows])
    xv, yv = read_rows(src, val, block=500)
    assert np.array_equal(xv, x_all[val]) and np.array_equal(yv, y_all[val])
    assert np.bincount(yv).tolist() == [27] * 10


@pytest.mark.parametrize("n_workers", [1, 2, 3, 5])
def test_trainers_workers_read_only_training_rows(fsdd, n_workers):
    """The trainers' own path (algorithms.common.TrainingSplit, used by serial, sync and every Downpour worker):
    each worker's rows avoid every validation row, the shares are disjoint and cover the training rows, each holds
    every class, and what a worker reads is exactly those rows of the file."""
    from asyncsgd.algorithms.common import TrainingSplit
    src, (x_all, y_all) = fsdd
    split = TrainingSplit(src, 0.1, seed=3)
    assert split.n_validation == 270 and split.n_train == src.n_train - 270
    shares = [split.share_rows(w, n_workers) for w in range(n_workers)]
    assert np.array_equal(np.sort(np.concatenate(shares)), split.train_rows)
    assert max(s.size for s in shares) - min(s.size for s in shares) <= 1
    for w, rows in enumerate(shares):
        assert np.intersect1d(rows, split.validation_rows).size == 0
        assert len(set(y_all[rows].tolist())) == src.n_classes
        x, y = split.share(w, n_workers)
        assert np.array_equal(x, x_all[rows]) and np.array_equal(y, y_all[rows])
    xv, yv = split.validation_set()
    assert np.array_equal(xv, x_all[split.validation_rows]) and np.array_equal(yv, y_all[split.validation_rows])


def test_trainers_without_validation_read_todays_class_strided_slices(fsdd):
    from asyncsgd.algorithms.common import TrainingSplit
    src, _ = fsdd
    split = TrainingSplit(src, 0.0, seed=3)
    assert split.n_validation == 0 and split.validation_set() is None
    for w in range(3):
        x, y = split.share(w, 3)
        xs, ys = src.train_slice(w, 3)
        assert np.array_equal(x, xs) and np.array_equal(y, ys)


def test_without_validation_the_partition_is_contiguous_bounds():
    from asyncsgd.data.partition import contiguous_bounds
    train, val = split_holdout(_labels([34, 33, 33]), 0.0, seed=0)
    assert val.size == 0
    for part in range(3):
        assert np.array_equal(partition_rows(train, part, 3), np.arange(*contiguous_bounds(100, 3)[part]))
    with pytest.raises(ValueError, match="part must be in"):
        partition_rows(train, 3, 3)


def test_strided_partition_balances_classes_of_a_label_sorted_file():
    y = np.repeat(np.arange(4), 30).astype(np.int64)          # sorted by label
    train, val = split_holdout(y, 0.1, seed=0)
    contiguous = [partition_rows(train, w, 3) for w in range(3)]
    strided = [partition_rows(train, w, 3, strided=True) for w in range(3)]
    assert np.array_equal(np.sort(np.concatenate(strided)), train)
    assert max(p.size for p in strided) - min(p.size for p in strided) <= 1
    assert all(len(set(y[p].tolist())) == 4 for p in strided)
    assert any(len(set(y[p].tolist())) < 4 for p in contiguous), "contiguous runs of a sorted file are not balanced"
    assert all(np.intersect1d(p, val).size == 0 for p in strided)


def test_read_rows_of_generated_data():
    src = open_source("synthetic:100")
    x_all, y_all = src.train_range(0, 100)
    rows = np.array([0, 5, 6, 7, 50, 99])
    x, y = read_rows(src, rows, block=7)
    assert np.array_equal(x, x_all[rows]) and np.array_equal(y, y_all[rows])


def test_read_rows_refuses_bad_rows():
    src = open_source("synthetic:40")
    for rows, match in (([], "non-empty"), ([3, 2], "sorted and unique"), ([1, 1], "sorted and unique"),
                        ([0, 40], "must lie in")):
        with pytest.raises(ValueError, match=match):
            read_rows(src, np.array(rows, dtype=np.int64))
