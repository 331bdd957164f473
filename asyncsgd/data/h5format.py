"""The asyncsgd HDF5 data set layout: writing a file, and validating one with a single clear error.

Layout (documented for users in ``data/README.md``)::

    /train/x   [N, C, H, W]  float32 or float16 features   (rows in any order: each worker takes a strided share)
    /train/y   [N]           int64 labels in [0, n_classes)
    /test/x    [M, C, H, W]
    /test/y    [M]
    /train/names, /test/names  [N] / [M] bytes, optional: where each row came from (e.g. '7_jackson_32')
    root attributes: n_classes (required), format_version, feature, source, license, ... (free-form, described)

Every problem a reader can meet is reported as one :class:`DataError` ``"<file>: <problem>"``, raised before any
training starts, so an MPI job fails on rank 0 with one line instead of a traceback on every rank.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np

__all__ = ["DataError", "FileSummary", "FORMAT_VERSION", "SPLITS", "validate_file", "write_dataset",
           "write_dataset_blocks", "balanced_order", "label_order", "round_mantissa", "h5open"]

FORMAT_VERSION = 1
SPLITS = ("train", "test")
FEATURE_DTYPES = (np.float16, np.float32)
# Rows scanned at a time for NaN/Inf: bounds memory (a few MB) while keeping h5py call overhead small.
_SCAN_BYTES = 8 << 20


class DataError(ValueError):
    """A data set that cannot be used: the message names the file (or spec) and the problem."""


@dataclass
class FileSummary:
    """What validation found: shapes, dtype and root attributes of a valid file."""
    path: str
    input_shape: tuple
    n_classes: int
    counts: dict                     # split -> number of rows
    feature_dtype: str
    attrs: dict = field(default_factory=dict)
    label_order: str | None = None   # the training labels' order (``label_order``), when the labels were scanned

    def describe(self) -> str:
        """Return a short human-readable summary (the ``check`` subcommand prints it)."""
        c, h, w = self.input_shape
        lines = [f"{self.path}: valid asyncsgd data set",
                 f"  train {self.counts['train']} rows, test {self.counts['test']} rows, input {c}x{h}x{w} "
                 f"{self.feature_dtype}, {self.n_classes} classes"]
        if self.label_order is not None:
            lines.append(f"  train label order: {self.label_order}")
        for key in sorted(self.attrs):
            if key != "n_classes":
                lines.append(f"  {key}: {self.attrs[key]}")
        return "\n".join(lines)


def h5open(path, mode="r"):
    """Open an HDF5 file; reads skip HDF5 file locking, which fails on some cluster file systems (NFS, Lustre)."""
    import h5py
    if mode == "r":
        return h5py.File(path, "r", locking=False)
    return h5py.File(path, mode)


def _attr_value(v):
    """Convert an h5py attribute to a plain Python value (bytes -> str, numpy scalar -> int/float)."""
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def validate_file(path, *, scan_values: bool = True) -> FileSummary:
    """Check that ``path`` is a usable data set; return its summary or raise one DataError naming file and problem.

    Structure (groups, datasets, ranks, dtypes, counts, n_classes) is always checked and costs a few metadata reads.
    ``scan_values`` also reads every label (range check) and every feature in ~8 MB chunks (NaN/Inf check); the
    bundled file takes well under a second.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected an HDF5 file")
    try:
        with h5open(path) as f:
            return _validate_open(f, path, scan_values)
    except DataError:
        raise
    except (OSError, KeyError, RuntimeError, ValueError) as exc:
        # h5py reports a non-HDF5 file as 'file signature not found' and a cut-off one as 'truncated file'
        # at open, or as a read error when a chunk lies past the end.
        raise DataError(f"{path}: not a readable HDF5 file (truncated, corrupt or not HDF5): {exc}") from None


def _validate_open(f, path, scan_values) -> FileSummary:
    import h5py
    attrs = {k: _attr_value(v) for k, v in f.attrs.items()}
    if "n_classes" not in attrs:
        raise DataError(f"{path}: missing root attribute 'n_classes' (number of classes, an integer >= 2)")
    n_classes = attrs["n_classes"]
    if not isinstance(n_classes, int) or isinstance(n_classes, bool) or n_classes < 2:
        raise DataError(f"{path}: attribute n_classes must be an integer >= 2, got {n_classes!r}")
    shapes, counts, dtypes = {}, {}, {}
    for split in SPLITS:
        for name in ("x", "y"):
            key = f"{split}/{name}"
            if key not in f or not isinstance(f[key], h5py.Dataset):
                raise DataError(f"{path}: missing dataset /{key} (expected /train/x, /train/y, /test/x, /test/y)")
        x, y = f[f"{split}/x"], f[f"{split}/y"]
        if x.ndim != 4:
            raise DataError(f"{path}: /{split}/x has rank {x.ndim} (shape {x.shape}), expected rank 4 [N, C, H, W]")
        if x.dtype not in FEATURE_DTYPES:
            raise DataError(f"{path}: /{split}/x has dtype {x.dtype}, expected float32 or float16")
        if y.ndim != 1:
            raise DataError(f"{path}: /{split}/y has rank {y.ndim} (shape {y.shape}), expected rank 1 [N]")
        if y.dtype.kind not in "iu":
            raise DataError(f"{path}: /{split}/y has dtype {y.dtype}, expected int64 labels")
        if x.shape[0] != y.shape[0]:
            raise DataError(f"{path}: /{split}/x has {x.shape[0]} rows but /{split}/y has {y.shape[0]} labels")
        if x.shape[0] == 0:
            raise DataError(f"{path}: the {split} split is empty (0 rows)")
        if min(x.shape[1:]) == 0:
            raise DataError(f"{path}: /{split}/x has an empty feature shape {x.shape[1:]}")
        shapes[split], counts[split], dtypes[split] = tuple(x.shape[1:]), x.shape[0], x.dtype
    if shapes["train"] != shapes["test"]:
        raise DataError(f"{path}: train features are {shapes['train']} but test features are {shapes['test']}")
    order = None
    if scan_values:
        for split in SPLITS:
            labels = _scan_labels(f[f"{split}/y"], path, split, n_classes)
            if split == "train":
                order = label_order(labels)
            _scan_features(f[f"{split}/x"], path, split)
    return FileSummary(path=path, input_shape=shapes["train"], n_classes=n_classes, counts=counts,
                       feature_dtype=str(dtypes["train"]), attrs=attrs, label_order=order)


def _scan_labels(y, path, split, n_classes):
    labels = y[...]
    bad = np.flatnonzero((labels < 0) | (labels >= n_classes))
    if bad.size:
        i = int(bad[0])
        raise DataError(f"{path}: /{split}/y[{i}] = {int(labels[i])} is out of range: labels must lie in "
                        f"[0, n_classes={n_classes}) ({bad.size} bad labels)")
    return labels


def label_order(y) -> str:
    """Describe the order of labels ``y`` (int [N]): 'sorted by class', 'grouped by class', 'partly grouped', 'mixed'.

    Counts the runs of equal consecutive labels: one run per class means the rows are grouped by class (sorted
    when the runs come in label order); a shuffled file has about ``1 + (N-1)(1 - sum p_c^2)`` runs, and fewer than
    half of those means long same-class stretches.  Training is class-balanced whatever the answer (each worker
    takes a strided share); the line tells a user why a contiguous split of this file would not be.
    """
    y = np.asarray(y)
    if y.size < 2:
        return "mixed (fewer than 2 rows)"
    runs = 1 + int(np.count_nonzero(y[1:] != y[:-1]))
    counts = np.unique(y, return_counts=True)[1]
    p = counts / y.size
    shuffled = 1 + (y.size - 1) * (1 - float(np.sum(p * p)))
    detail = f"{runs} runs of equal labels, about {shuffled:.0f} if shuffled"
    if runs == counts.size and counts.size > 1:
        diffs = np.diff(y)
        kind = "sorted by class" if (diffs >= 0).all() or (diffs <= 0).all() else "grouped by class"
        return f"{kind} ({detail}; every worker still gets every class: shares are strided)"
    if runs < 0.5 * shuffled:
        return f"partly grouped by class ({detail}; shares are strided, so every worker gets every class)"
    return f"mixed ({detail})"


def _scan_features(x, path, split):
    row_bytes = int(np.prod(x.shape[1:])) * x.dtype.itemsize
    # Align the scan to the storage chunks so each compressed chunk is decompressed once.
    step = max(1, _SCAN_BYTES // row_bytes)
    if x.chunks:
        step = max(x.chunks[0], step - step % x.chunks[0])
    for start in range(0, x.shape[0], step):
        block = x[start:start + step]
        finite = np.isfinite(block).reshape(block.shape[0], -1).all(axis=1)
        if not finite.all():
            i = start + int(np.flatnonzero(~finite)[0])
            raise DataError(f"{path}: /{split}/x row {i} contains NaN or Inf features")


def balanced_order(y, seed: int) -> np.ndarray:
    """Return a fixed permutation of rows such that every contiguous run of the result is class-balanced.

    Rows of each class are shuffled, and the k-th row of a class with n_c rows gets the key (k + u) / n_c with a
    random u in [0, 1) per row; sorting by key interleaves the classes in proportion to their sizes (in a random
    order within each round), so any contiguous slice of length L holds L * n_c / N rows of class c to within two.
    """
    y = np.asarray(y)
    rng = np.random.default_rng(seed)
    keys = np.empty(len(y), dtype=np.float64)
    for c in np.unique(y):
        rows = rng.permutation(np.flatnonzero(y == c))
        keys[rows] = (np.arange(len(rows)) + rng.random(len(rows))) / len(rows)
    return np.argsort(keys, kind="stable")


def round_mantissa(x16: np.ndarray, bits: int) -> np.ndarray:
    """Round float16 values to ``bits`` mantissa bits (of 10), to nearest even, so gzip finds zero low bits.

    The relative error is at most 2**-(bits+1); the result is still an ordinary float16 array.
    """
    if x16.dtype != np.float16:
        raise ValueError(f"round_mantissa needs float16, got {x16.dtype}")
    if not 0 <= bits <= 10:
        raise ValueError(f"mantissa bits must be in 0..10, got {bits}")
    if bits == 10:
        return x16.copy()
    drop = 10 - bits
    u = x16.view(np.uint16).astype(np.uint32)
    # round half to even: add (half - 1) plus the lowest kept bit, then clear the dropped bits
    u = u + ((1 << (drop - 1)) - 1) + ((u >> drop) & 1)
    u &= ~np.uint32((1 << drop) - 1)
    return u.astype(np.uint16).view(np.float16)


def write_dataset(path, train, test, attrs: dict, *, dtype=np.float32, mantissa_bits: int | None = None,
                  names=None, compress: int | None = 9):
    """Write a data set file: ``train``/``test`` are (x [N,C,H,W], y [N]); rows are written in the order given.

    dtype: float32 or float16 storage.  mantissa_bits: for float16, round to that many mantissa bits first (lossy,
    recorded in the attribute ``mantissa_bits``).  names: optional (train_names, test_names) sequences of str.
    compress: gzip level (with the byte-shuffle filter) or None for uncompressed contiguous storage.
    """
    for split, (x, y) in zip(SPLITS, (train, test)):
        if np.ndim(x) != 4 or len(x) != len(y):
            raise ValueError(f"{split}: x must be [N, C, H, W] with one label per row, got {np.shape(x)}, {len(y)}")
    if np.shape(train[0])[1:] != np.shape(test[0])[1:]:
        raise ValueError(f"train and test feature shapes differ: {np.shape(train[0])} vs {np.shape(test[0])}")
    write_dataset_blocks(path, {"train": len(train[1]), "test": len(test[1])}, np.shape(train[0])[1:],
                         lambda split: [train if split == "train" else test], attrs, dtype=dtype,
                         mantissa_bits=mantissa_bits, names=names, compress=compress)


def write_dataset_blocks(path, counts: dict, input_shape, blocks, attrs: dict, *, dtype=np.float32,
                         mantissa_bits: int | None = None, names=None, compress: int | None = 9):
    """Write a data set whose rows come in blocks: ``blocks(split)`` yields (x [b,C,H,W], y [b]) until counts[split].

    Lets a generator write files larger than memory.  The file appears under ``path`` only when complete
    (written to a temporary name, then renamed), so an interrupted run leaves no half file behind.
    """
    dtype = np.dtype(dtype)
    if dtype not in FEATURE_DTYPES:
        raise ValueError(f"storage dtype must be float32 or float16, got {dtype}")
    if mantissa_bits is not None and dtype != np.float16:
        raise ValueError("mantissa_bits applies to float16 storage only")
    if "n_classes" not in attrs:
        raise ValueError("attrs must contain n_classes")
    input_shape = tuple(int(d) for d in input_shape)
    row_bytes = int(np.prod(input_shape)) * dtype.itemsize
    tmp = f"{os.fspath(path)}.tmp{os.getpid()}"
    try:
        with h5open(tmp, "w") as f:
            f.attrs["format_version"] = FORMAT_VERSION
            for k, v in attrs.items():
                f.attrs[k] = v
            f.attrs["storage_dtype"] = str(dtype)
            if mantissa_bits is not None:
                f.attrs["mantissa_bits"] = int(mantissa_bits)
            for i, split in enumerate(SPLITS):
                n = int(counts[split])
                # ~256 KB chunks: small enough that a worker's slice reads little beyond its rows
                rows = max(1, min(n, (256 << 10) // row_bytes))
                opts = (dict(compression="gzip", compression_opts=compress, shuffle=True, chunks=(rows,) + input_shape)
                        if compress is not None else {})
                # no timestamps in the file: rebuilding the same data gives the same bytes (no spurious git diffs)
                dx = f.create_dataset(f"{split}/x", shape=(n,) + input_shape, dtype=dtype, track_times=False,
                                      **opts)
                dy = f.create_dataset(f"{split}/y", shape=(n,), dtype=np.int64, track_times=False,
                                      **(dict(compression="gzip", shuffle=True) if compress is not None else {}))
                pos = 0
                for x, y in blocks(split):
                    xs = np.asarray(x).astype(dtype)
                    if mantissa_bits is not None:
                        xs = round_mantissa(xs, mantissa_bits)
                    dx[pos:pos + len(xs)] = xs
                    dy[pos:pos + len(xs)] = np.asarray(y, dtype=np.int64)
                    pos += len(xs)
                if pos != n:
                    raise ValueError(f"{split}: blocks gave {pos} rows, expected {n}")
                if names is not None:
                    f.create_dataset(f"{split}/names", data=np.array([s.encode() for s in names[i]], dtype="S"),
                                     track_times=False)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
