"""The HDF5 data format: writing, reading slices, validation errors (message and CLI exit), batches, synthetic data."""
import os
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

from asyncsgd.data import BatchStream, DataError, open_source, resolve_path, write_dataset
from asyncsgd.data.__main__ import main as data_main
from asyncsgd.data.h5format import balanced_order, label_order, round_mantissa
from asyncsgd.data.synthetic import BLOCK, SyntheticSource
from asyncsgd.data.partition import class_strided_rows
from paths import REPO, repo_env



def _arrays(n_train=40, n_test=10, shape=(1, 4, 5), seed=0):
    rng = np.random.default_rng(seed)
    return ((rng.normal(size=(n_train,) + shape).astype(np.float32), np.arange(n_train) % 10),
            (rng.normal(size=(n_test,) + shape).astype(np.float32), np.arange(n_test) % 10))


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "good.h5"
    train, test = _arrays()
    write_dataset(path, train, test, {"n_classes": 10, "source": "test"}, dtype=np.float16)
    return path, train, test


def check_cli(path, capsys=None):
    """Run ``python -m asyncsgd.data check PATH``; return (exit status, stderr).

    With ``capsys`` the CLI's main() runs in this process (what ``python -m`` passes to sys.exit), which saves an
    interpreter start per case; without, a real subprocess is started.
    """
    if capsys is not None:
        capsys.readouterr()
        rc = data_main(["check", str(path)])
        return rc, capsys.readouterr().err
    out = subprocess.run([sys.executable, "-m", "asyncsgd.data", "check", str(path)], capture_output=True,
                         text=True, timeout=120, cwd=REPO, env=repo_env())
    return out.returncode, out.stderr


def test_roundtrip_float16_returns_float32(good_file):
    path, (xtr, ytr), (xte, yte) = good_file
    src = open_source(str(path))
    assert (src.n_train, src.n_test, src.input_shape, src.n_classes) == (40, 10, (1, 4, 5), 10)
    assert src.attrs["source"] == "test" and src.attrs["storage_dtype"] == "float16"
    x, y = src.train_range(0, 40)
    assert x.dtype == np.float32 and y.dtype == np.int64
    np.testing.assert_array_equal(x, xtr.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(y, ytr)
    xt, yt = src.test_set()
    np.testing.assert_array_equal(xt, xte.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(yt, yte)


@pytest.mark.parametrize("n_parts", [1, 2, 3, 6, 7])
def test_train_slices_are_class_strided_disjoint_and_cover(good_file, n_parts):
    path, (xtr, ytr), _ = good_file
    src = open_source(str(path))
    x_all, _ = src.train_range(0, 40)
    parts = [src.train_slice(p, n_parts) for p in range(n_parts)]
    sizes = [len(y) for _, y in parts]
    assert max(sizes) - min(sizes) <= 1
    rows = [class_strided_rows(ytr, p, n_parts) for p in range(n_parts)]
    assert sorted(np.concatenate(rows).tolist()) == list(range(40))   # disjoint, and every row once
    for p, (x, y) in enumerate(parts):
        np.testing.assert_array_equal(y, ytr[rows[p]])
        np.testing.assert_array_equal(x, x_all[rows[p]])
        counts = np.bincount(y, minlength=10)
        assert counts.max() - counts.min() <= 1, counts


@pytest.mark.parametrize("n_parts", [3, 5, 6])
def test_label_sorted_file_gives_every_worker_every_class(tmp_path, n_parts):
    """A file written in class order: every worker's share holds all 10 classes in near-equal proportion.

    Contiguous slices (the landed code) gave each of 5 workers two classes of this file.
    """
    rng = np.random.default_rng(4)
    y = np.repeat(np.arange(10), 300)                  # 3,000 rows: all the 0s, then all the 1s, ...
    x = rng.normal(size=(3000, 1, 2, 2)).astype(np.float32)
    path = tmp_path / "sorted.h5"
    write_dataset(path, (x, y), (x[:10], y[:10]), {"n_classes": 10})
    src = open_source(str(path))
    for p in range(n_parts):
        xs, ys = src.train_slice(p, n_parts)
        counts = np.bincount(ys, minlength=10)
        share = 3000 / n_parts / 10
        assert np.abs(counts - share).max() <= 1, f"worker {p} of {n_parts}: class counts {counts.tolist()}"
        np.testing.assert_array_equal(xs, x[p::n_parts])   # on a sorted file: the plain stride


def test_synthetic_share_matches_its_rows():
    src = SyntheticSource(2 * BLOCK + 37)
    x_all, y_all = src.train_range(0, src.n_train)
    for p in range(3):
        x, y = src.train_slice(p, 3)
        rows = class_strided_rows(y_all, p, 3)
        np.testing.assert_array_equal(y, y_all[rows])
        np.testing.assert_array_equal(x, x_all[rows])


def test_label_order_names_sorted_grouped_and_mixed():
    rng = np.random.default_rng(0)
    assert label_order(np.repeat(np.arange(10), 50)).startswith("sorted by class")
    assert label_order(np.repeat([3, 1, 2], 50)).startswith("grouped by class")
    assert label_order(np.repeat(np.tile(np.arange(10), 3), 20)).startswith("partly grouped")
    assert label_order(rng.integers(0, 10, 500)).startswith("mixed")
    assert label_order(np.arange(500) % 10).startswith("mixed")


def test_check_cli_reports_the_label_order(tmp_path, capsys):
    y = np.repeat(np.arange(10), 20)
    x = np.zeros((200, 1, 2, 2), np.float32)
    for name, order in (("sorted", np.arange(200)), ("shuffled", np.random.default_rng(1).permutation(200))):
        write_dataset(tmp_path / f"{name}.h5", (x, y[order]), (x[:10], y[:10]), {"n_classes": 10})
    out = subprocess.run([sys.executable, "-m", "asyncsgd.data", "check", str(tmp_path / "sorted.h5")],
                         capture_output=True, text=True, timeout=120, cwd=REPO, env=repo_env())
    assert out.returncode == 0, out.stderr
    assert "train label order: sorted by class (10 runs of equal labels" in out.stdout
    capsys.readouterr()
    assert data_main(["check", str(tmp_path / "shuffled.h5")]) == 0
    assert "train label order: mixed" in capsys.readouterr().out


def test_bad_slice_requests(good_file):
    src = open_source(str(good_file[0]))
    with pytest.raises(ValueError, match="cannot split 40 training rows among 41 workers"):
        src.train_slice(0, 41)
    with pytest.raises(ValueError, match="part must be in"):
        src.train_slice(3, 3)
    with pytest.raises(ValueError, match="outside"):
        src.train_range(10, 41)


# ---- invalid files: one DataError naming the file and the problem, and exit status 2 from the CLI ----

def _mutate(path, fn):
    with h5py.File(path, "a") as f:
        fn(f)


def _replace(key, data):
    def fn(f):
        del f[key]
        f.create_dataset(key, data=data)
    return fn


BAD_CASES = {
    "missing_group": (lambda f: f.__delitem__("test"), r"missing dataset /test/x"),
    "missing_dataset": (lambda f: f.__delitem__("train/y"), r"missing dataset /train/y"),
    "count_mismatch": (_replace("train/y", np.arange(39) % 10), r"/train/x has 40 rows but /train/y has 39 labels"),
    "negative_label": (_replace("test/y", np.array([0, 1, 2, -1, 4, 5, 6, 7, 8, 9])),
                       r"/test/y\[3\] = -1 is out of range"),
    "label_too_big": (_replace("train/y", np.full(40, 10)), r"/train/y\[0\] = 10 is out of range.*n_classes=10"),
    "nan": (lambda f: f["train/x"].__setitem__((17, 0, 1, 2), np.nan), r"/train/x row 17 contains NaN or Inf"),
    "inf": (lambda f: f["test/x"].__setitem__((9, 0, 0, 0), np.inf), r"/test/x row 9 contains NaN or Inf"),
    "empty_split": (lambda f: (_replace("test/x", np.zeros((0, 1, 4, 5), np.float32))(f),
                               _replace("test/y", np.zeros(0, np.int64))(f)), r"the test split is empty"),
    "wrong_rank": (_replace("train/x", np.zeros((40, 4, 5), np.float32)), r"/train/x has rank 3.*expected rank 4"),
    "no_n_classes": (lambda f: f.attrs.__delitem__("n_classes"), r"missing root attribute 'n_classes'"),
    "shape_differs": (lambda f: (_replace("test/x", np.zeros((10, 1, 4, 6), np.float32))(f)),
                      r"train features are \(1, 4, 5\) but test features are \(1, 4, 6\)"),
}


@pytest.mark.parametrize("case", sorted(BAD_CASES))
def test_invalid_file_error_and_cli_exit(good_file, case, capsys):
    path, _, _ = good_file
    fn, pattern = BAD_CASES[case]
    _mutate(path, fn)
    with pytest.raises(DataError, match=pattern) as info:
        open_source(str(path))
    assert str(info.value).startswith(str(path) + ": ")
    rc, err = check_cli(path, capsys)
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {path}: ")


@pytest.mark.parametrize("case", ["missing_file", "not_hdf5", "truncated", "directory"])
def test_unreadable_file_error_and_cli_exit(good_file, tmp_path, case, capsys):
    path = tmp_path / f"{case}.h5"
    if case == "not_hdf5":
        path.write_text("this is not an HDF5 file\n")
    elif case == "truncated":
        data = good_file[0].read_bytes()
        path.write_bytes(data[:len(data) // 2])
    elif case == "directory":
        path.mkdir()
    expected = {"missing_file": "no such file", "directory": "is a directory"}.get(
        case, "not a readable HDF5 file")
    with pytest.raises(DataError, match=expected) as info:
        open_source(str(path))
    assert str(path) in str(info.value)
    # one case through a real interpreter: the process exit status itself
    rc, err = check_cli(path, None if case == "not_hdf5" else capsys)
    assert rc == 2 and len(err.strip().splitlines()) == 1 and expected in err


def test_cli_check_prints_summary(good_file):
    out = subprocess.run([sys.executable, "-m", "asyncsgd.data", "check", str(good_file[0])], capture_output=True,
                         text=True, timeout=60, cwd=REPO, env=repo_env())
    assert out.returncode == 0, out.stderr
    assert "train 40 rows, test 10 rows, input 1x4x5 float16, 10 classes" in out.stdout


def test_bad_synthetic_spec():
    for spec in ("synthetic:", "synthetic:0", "synthetic:ten"):
        with pytest.raises(DataError, match="N must be a positive integer"):
            open_source(spec)


# ---- helpers of the format ----

def test_balanced_order_makes_contiguous_slices_balanced():
    rng = np.random.default_rng(3)
    y = rng.permutation(np.repeat(np.arange(10), [50, 60, 70, 80, 90, 100, 40, 30, 20, 10]))
    order = balanced_order(y, seed=1)
    assert sorted(order) == list(range(len(y)))
    ys = y[order]
    share = np.bincount(y) / len(y)
    for length in (25, 100, 333):
        for start in range(0, len(y) - length, 17):
            counts = np.bincount(ys[start:start + length], minlength=10)
            assert np.abs(counts - length * share).max() <= 2.0
    np.testing.assert_array_equal(order, balanced_order(y, seed=1))
    assert not np.array_equal(order, balanced_order(y, seed=2))


def test_round_mantissa_error_bound_and_exact_cases():
    x = np.random.default_rng(0).normal(size=10000).astype(np.float16)
    for bits in (4, 7, 9):
        r = round_mantissa(x, bits)
        rel = np.abs(r.astype(np.float64) - x) / np.abs(x.astype(np.float64))
        assert rel.max() <= 2.0 ** -(bits + 1) + 1e-12
        assert not (r.view(np.uint16) & ((1 << (10 - bits)) - 1)).any()
    np.testing.assert_array_equal(round_mantissa(x, 10), x)
    # 1 + 2**-8 + 2**-10 rounds up to 1 + 2**-7 at 7 bits; exact halves go to even
    v = np.array([1 + 2 ** -8 + 2 ** -10, 1 + 2 ** -8, 1 + 3 * 2 ** -8], dtype=np.float16)
    np.testing.assert_array_equal(round_mantissa(v, 7).astype(np.float64), [1 + 2 ** -7, 1.0, 1 + 2 ** -6])


# ---- the bundled file ----

def test_bundled_fsdd_file():
    path = resolve_path("fsdd")
    assert os.path.samefile(path, os.path.join(REPO, "data", "fsdd.h5"))
    assert os.path.getsize(path) <= 10 * 1000 * 1000
    t0 = time.process_time()          # CPU time: wall time on a loaded test machine says little
    src = open_source("fsdd")
    elapsed = time.process_time() - t0
    assert elapsed < 1.0, f"validating the bundled file took {elapsed:.2f} s of CPU time"
    assert (src.name, src.n_train, src.n_test, src.input_shape, src.n_classes) == ("fsdd", 2700, 300, (1, 40, 64), 10)
    assert src.attrs["n_mels"] == 40 and src.attrs["frames"] == 64 and src.attrs["sample_rate"] == 8000
    assert "CC BY-SA 4.0" in src.attrs["license"] and "Free Spoken Digit" in src.attrs["source"]
    _, yte = src.test_set()
    assert np.bincount(yte).tolist() == [30] * 10
    for part in range(6):       # each of 6 workers gets 450 rows, 45 of each digit (to within two)
        x, y = src.train_slice(part, 6)
        assert x.dtype == np.float32 and x.shape == (450, 1, 40, 64)
        assert np.abs(np.bincount(y, minlength=10) - 45).max() <= 2


# ---- batches ----

def test_batch_stream_wraps_and_reshuffles_every_epoch():
    x = np.arange(10, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)
    y = np.arange(10)
    stream = BatchStream(x, y, batch_size=4, seed=5)
    batches = [next(stream) for _ in range(5)]                # 20 rows = 2 full epochs
    assert all(xb.shape == (4, 3) and yb.shape == (4,) for xb, yb in batches)
    assert all(np.array_equal(xb[:, 0], yb) for xb, yb in batches)
    rows = np.concatenate([yb for _, yb in batches])
    assert sorted(rows[:10]) == list(range(10)) and sorted(rows[10:]) == list(range(10))
    assert not np.array_equal(rows[:10], rows[10:])           # a new order in epoch 2
    assert stream.samples_seen == 20 and stream.epoch == 2 and stream.epochs == 2.0
    again = BatchStream(x, y, batch_size=4, seed=5)
    np.testing.assert_array_equal(np.concatenate([next(again)[1] for _ in range(5)]), rows)
    other = BatchStream(x, y, batch_size=4, seed=6)
    assert not np.array_equal(np.concatenate([next(other)[1] for _ in range(5)]), rows)


def test_batch_stream_larger_than_slice_and_bad_input():
    stream = BatchStream(np.zeros((3, 2)), np.arange(3), batch_size=7, seed=0)
    _, yb = next(stream)
    assert len(yb) == 7 and stream.epoch == 2 and np.bincount(yb[:6]).tolist() == [2, 2, 2]
    with pytest.raises(ValueError, match="empty"):
        BatchStream(np.zeros((0, 2)), np.zeros(0), 4)
    with pytest.raises(ValueError, match="batch_size"):
        BatchStream(np.zeros((3, 2)), np.arange(3), 0)


# ---- synthetic ----

def test_synthetic_is_deterministic_and_sliceable():
    src = open_source("synthetic:1100")
    assert (src.n_train, src.n_test, src.input_shape, src.n_classes) == (1100, 220, (1, 40, 64), 10)
    x, y = src.train_range(0, 1100)
    assert x.dtype == np.float32 and np.isfinite(x).all()
    # a slice crossing a block boundary equals the same rows of the full set, on a fresh source too
    xs, ys = SyntheticSource(1100).train_range(BLOCK - 30, BLOCK + 70)
    np.testing.assert_array_equal(xs, x[BLOCK - 30:BLOCK + 70])
    np.testing.assert_array_equal(ys, y[BLOCK - 30:BLOCK + 70])
    for start in range(0, 1100, 10):          # rounds of 10 hold every class once
        assert sorted(y[start:start + 10]) == list(range(10))
    xt, yt = src.test_set()
    assert len(yt) == 220 and not np.array_equal(xt[:10], x[:10])
    assert open_source("synthetic:3").n_test == 10
    np.testing.assert_allclose(x.mean(axis=(1, 2, 3)), 0, atol=1e-4)


def test_synthetic_classes_are_separable():
    """A nearest-centroid classifier, fitted on train, must beat chance by far on test (the classes differ)."""
    src = open_source("synthetic:1000")
    x, y = src.train_range(0, 1000)
    xt, yt = src.test_set()
    centroids = np.stack([x[y == c].reshape(-1, 2560).mean(0) for c in range(10)])
    dist = ((xt.reshape(-1, 1, 2560) - centroids[None]) ** 2).sum(-1)
    assert (dist.argmin(1) == yt).mean() > 0.6
