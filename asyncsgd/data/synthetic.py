"""Synthetic speech-like data: deterministic, any size, generated in memory ('synthetic:N').

Each example is a 1 x 40 x 64 "log-mel spectrogram" of one of 10 classes.  A class is a fixed set of three
formant-like tracks: Gaussian ridges across the 40 bands whose centre glides linearly (a chirp) from a class-specific
start band to a class-specific end band while the "utterance" lasts.  Each example draws its own onset (frames
0-20), duration (30-48 frames), band shift (+-2.5 bands), track strengths (x0.7-1.3) and Gaussian noise (sd 1.0,
the ridges peak at ~3), and is then normalised like the real features (zero mean, unit variance per example).
It is easy on purpose (a quick, learnable check of the training machinery): on synthetic:5000 a nearest-centroid
classifier scores 82% and full-batch softmax regression 99% on the test set after 200 steps.

Sizes: ``synthetic:N`` has N training and max(10, N // 5) test examples.  Rows are generated in blocks of 1,000
from the seed, the split and the block number, so any row range can be produced on its own and every worker sees
the same row i whatever slice it asks for; labels run in rounds of 10 holding each class once (class-balanced
contiguous slices, like the stored files).
"""
from __future__ import annotations

import numpy as np

from asyncsgd.data.h5format import write_dataset_blocks
from asyncsgd.data.base import DataSource

__all__ = ["SyntheticSource", "synthetic_block", "write_synthetic", "N_CLASSES", "INPUT_SHAPE", "n_test_for"]

N_CLASSES = 10
INPUT_SHAPE = (1, 40, 64)
BLOCK = 1000               # rows per generated block (a multiple of N_CLASSES)
_SPLIT_ID = {"train": 0, "test": 1}
_TEMPLATE_SEED = 1402      # class templates are part of the data set's definition, independent of ``seed``


def n_test_for(n_train: int) -> int:
    """Test examples of ``synthetic:N``: N // 5, at least 10 (one per class)."""
    return max(N_CLASSES, n_train // 5)


def _class_tracks() -> np.ndarray:
    """Return [10, 3, 3] (start band, end band, strength) of each class's three formant tracks."""
    rng = np.random.default_rng(_TEMPLATE_SEED)
    tracks = np.empty((N_CLASSES, 3, 3))
    # track k lives in its own third of the bands (low/mid/high "formants"), so classes differ in where each
    # track starts and ends: rising, falling or flat chirps
    for k, (lo, hi) in enumerate(((3, 14), (14, 26), (26, 37))):
        tracks[:, k, 0] = rng.uniform(lo, hi, N_CLASSES)
        tracks[:, k, 1] = rng.uniform(lo, hi, N_CLASSES)
        tracks[:, k, 2] = rng.uniform(0.8, 1.2, N_CLASSES)
    return tracks


_TRACKS = _class_tracks()


def synthetic_block(seed: int, split: str, block: int) -> tuple[np.ndarray, np.ndarray]:
    """Return block ``block`` of a split: (x float32 [1000, 1, 40, 64], y int64 [1000]), same for same inputs."""
    rng = np.random.default_rng([seed, _SPLIT_ID[split], block])
    n = BLOCK
    y = rng.permuted(np.tile(np.arange(N_CLASSES), (n // N_CLASSES, 1)), axis=1).ravel()
    _, n_bands, n_frames = INPUT_SHAPE
    onset = rng.uniform(0, 20, n)[:, None]
    duration = rng.uniform(30, 48, n)[:, None]
    t = np.arange(n_frames)[None, :]
    progress = np.clip((t - onset) / duration, 0.0, 1.0)                          # [n, T]
    # raised-cosine envelope: ~3 frames of attack and release, like a word's energy contour
    env = np.clip(np.minimum(t - onset, onset + duration - t) / 3.0, 0.0, 1.0)
    env = 0.5 - 0.5 * np.cos(np.pi * env)
    shift = rng.uniform(-2.5, 2.5, n)[:, None, None]
    bands = np.arange(n_bands, dtype=np.float32)[None, :, None]                   # [1, H, 1]
    # float32 from here: the [n, H, T] arrays dominate the cost
    x = rng.standard_normal((n, n_bands, n_frames), dtype=np.float32)             # noise, sd 1
    for k in range(3):
        start, end, strength = (_TRACKS[y, k, j][:, None] for j in range(3))
        centre = ((start + (end - start) * progress)[:, None, :] + shift).astype(np.float32)   # [n, 1, T]
        gain = (3.0 * strength * rng.uniform(0.7, 1.3, (n, 1)))[:, :, None] * env[:, None, :]
        x += gain.astype(np.float32) * np.exp(np.float32(-0.5 / 1.2 ** 2) * (bands - centre) ** 2)
    x -= x.mean(axis=(1, 2), keepdims=True)
    x /= x.std(axis=(1, 2), keepdims=True)
    return x[:, None], y.astype(np.int64)


def _rows(seed, split, start, stop):
    """Return rows [start, stop) of a split, generating only the blocks they touch."""
    xs, ys = [], []
    for b in range(start // BLOCK, (stop - 1) // BLOCK + 1):
        x, y = synthetic_block(seed, split, b)
        lo, hi = max(start - b * BLOCK, 0), min(stop - b * BLOCK, BLOCK)
        xs.append(x[lo:hi])
        ys.append(y[lo:hi])
    return np.concatenate(xs), np.concatenate(ys)


class SyntheticSource(DataSource):
    """``synthetic:N``: N deterministic training examples and max(10, N // 5) test examples, 1 x 40 x 64, 10 classes."""

    def __init__(self, n_train: int, seed: int = 0):
        if n_train < 1:
            raise ValueError(f"synthetic data needs at least 1 training example, got {n_train}")
        self.seed = int(seed)
        self.name = f"synthetic:{n_train}"
        self.input_shape = INPUT_SHAPE
        self.n_classes = N_CLASSES
        self.n_train, self.n_test = int(n_train), n_test_for(n_train)
        self.attrs = synthetic_attrs(self.seed)
        self._test = None

    def _read_train(self, start, stop):
        return _rows(self.seed, "train", start, stop)

    def _read_test(self):
        if self._test is None:
            self._test = _rows(self.seed, "test", 0, self.n_test)
        return self._test


def synthetic_attrs(seed: int) -> dict:
    """Attributes describing synthetic data (also written into files made by :func:`write_synthetic`)."""
    return {"n_classes": N_CLASSES, "feature": "synthetic log-mel-like chirps (3 formant tracks per class)",
            "source": "asyncsgd.data.synthetic (generated)", "license": "generated data, no restrictions",
            "seed": seed, "n_mels": INPUT_SHAPE[1], "frames": INPUT_SHAPE[2]}


def write_synthetic(out, n_train: int, *, seed: int = 0, dtype=np.float32, compress: int | None = None) -> dict:
    """Write ``synthetic:N`` (seed ``seed``) to an HDF5 file block by block (any size); return its counts."""
    n_test = n_test_for(n_train)
    counts = {"train": n_train, "test": n_test}

    def blocks(split):
        for start in range(0, counts[split], BLOCK):
            yield _rows(seed, split, start, min(start + BLOCK, counts[split]))

    write_dataset_blocks(out, counts, INPUT_SHAPE, blocks, synthetic_attrs(seed), dtype=dtype, compress=compress)
    return counts
