"""Convert the four gzip IDX files of MNIST into an asyncsgd HDF5 file.

Features: pixel / 255, so in [0, 1], shape [N, 1, 28, 28]; stored as float32 by default (exact to float32
rounding), or float16 (``--float16``: half the size, relative error <= 2**-11).  Labels int64 0-9.  The official
split is kept (60,000 train, 10,000 test); training rows are written in a fixed class-balanced order.
"""
from __future__ import annotations

import gzip
import os
import time

import numpy as np

from asyncsgd.data.h5format import DataError, balanced_order, write_dataset

__all__ = ["read_idx", "read_mnist", "convert_mnist", "MNIST_FILES", "MNIST_ATTRS", "ORDER_SEED"]

ORDER_SEED = 19980101
MNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
               "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
MNIST_ATTRS = {
    "feature": "pixels / 255 in [0, 1]",
    "source": "MNIST database, Y. LeCun, C. Cortes, C. J. C. Burges (IDX files)",
    "license": "CC BY-SA 3.0 (https://creativecommons.org/licenses/by-sa/3.0/)",
    "attribution": "MNIST database, Y. LeCun, C. Cortes, C. J. C. Burges",
    "split": "official: 60,000 train, 10,000 test",
    "class_names": "0,1,2,3,4,5,6,7,8,9",
}
_MAGIC = {1: 2049, 3: 2051}


def read_idx(path, *, limit: int | None = None) -> np.ndarray:
    """Return the uint8 array of a gzip IDX file (labels [N] or images [N, rows, cols]); ``limit`` keeps the first rows."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file (expected a gzip IDX file of MNIST)")
    try:
        with gzip.open(path, "rb") as fh:
            header = fh.read(4)
            if len(header) < 4 or header[:2] != b"\0\0" or header[2] != 8 or header[3] not in _MAGIC:
                raise DataError(f"{path}: not an IDX file of unsigned bytes (magic {header.hex()})")
            ndim = header[3]
            dims = np.frombuffer(fh.read(4 * ndim), dtype=">u4").astype(int)
            n = int(dims[0]) if limit is None else min(int(dims[0]), limit)
            count = n * int(np.prod(dims[1:]))
            data = np.frombuffer(fh.read(count), dtype=np.uint8)
    except (OSError, EOFError) as exc:
        raise DataError(f"{path}: cannot read gzip IDX data: {exc}") from None
    if data.size != count:
        raise DataError(f"{path}: truncated: expected {count} bytes of data, found {data.size}")
    return data.reshape((n,) + tuple(dims[1:]))


def read_mnist(idx_dir, *, limit: int | None = None) -> dict:
    """Return {'train': (x float32 [N,1,28,28], y int64), 'test': (...)} from the four files in ``idx_dir``."""
    out = {}
    for split, (images, labels) in MNIST_FILES.items():
        x = read_idx(os.path.join(idx_dir, images), limit=limit)
        y = read_idx(os.path.join(idx_dir, labels), limit=limit)
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{idx_dir}: {split} images {x.shape} and labels {y.shape} do not match")
        out[split] = ((x[:, None] / np.float32(255.0)).astype(np.float32), y.astype(np.int64))
    return out


def convert_mnist(idx_dir, out, *, dtype=np.float32, limit: int | None = None, compress: int | None = 1,
                  log=print) -> dict:
    """Write MNIST from ``idx_dir`` to ``out``; return {'seconds', 'bytes', 'train', 'test'}.

    compress: gzip level (default 1: MNIST is mostly zeros, so higher levels cost seconds and save little) or None.
    """
    t0 = time.perf_counter()
    data = read_mnist(idx_dir, limit=limit)
    xtr, ytr = data["train"]
    order = balanced_order(ytr, ORDER_SEED)
    attrs = dict(MNIST_ATTRS, n_classes=10, order_seed=ORDER_SEED)
    if limit is not None:
        attrs["limit"] = int(limit)
    write_dataset(out, (xtr[order], ytr[order]), data["test"], attrs, dtype=dtype, compress=compress)
    result = dict(seconds=time.perf_counter() - t0, bytes=os.path.getsize(out), train=len(ytr),
                  test=len(data["test"][1]))
    log(f"wrote {out}: {result['train']} train + {result['test']} test rows, 1x28x28 {np.dtype(dtype).name}, "
        f"{result['bytes'] / 1e6:.1f} MB in {result['seconds']:.1f} s")
    return result
