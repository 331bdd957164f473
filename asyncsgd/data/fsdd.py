"""Convert the Free Spoken Digit Dataset (FSDD) recordings into an asyncsgd HDF5 file of log-mel features.

Input: the ``recordings.tar.gz`` archive (read with tarfile, nothing unpacked) or a folder of
``{digit}_{speaker}_{index}.wav`` files (8 kHz mono 16-bit PCM, read with Python's wave module).
Split (the official rule of the FSDD README): index 0-4 is test (300 files), 5-49 is train (2,700 files).
Training rows are written in a fixed class-balanced order (:func:`asyncsgd.data.h5format.balanced_order`).
"""
from __future__ import annotations

import io
import os
import re
import tarfile
import time
import wave

import numpy as np

from asyncsgd.data.features import LogMelConfig, log_mel
from asyncsgd.data.h5format import DataError, balanced_order, write_dataset

__all__ = ["read_recordings", "parse_name", "fsdd_features", "convert_fsdd", "FSDD_ATTRS", "TEST_INDICES",
           "DEFAULT_MANTISSA_BITS", "ORDER_SEED"]

TEST_INDICES = range(0, 5)
ORDER_SEED = 20140101
# Full float16 (10 mantissa bits) with gzip+shuffle is 8.4 MB, inside the 10 MB budget, so nothing is rounded by
# default; --mantissa-bits 7 (relative error <= 2**-8) would give 6.8 MB.
DEFAULT_MANTISSA_BITS = None
_NAME = re.compile(r"^(\d)_([a-z]+)_(\d+)\.wav$")

FSDD_ATTRS = {
    "source": "Free Spoken Digit Dataset (FSDD), github.com/Jakobovski/free-spoken-digit-dataset, "
              "recordings/ at commit 26eb9aaf76e81b692f806f9140c2d2777410d7a1 (= release v1.0.10)",
    "license": "CC BY-SA 4.0 (https://creativecommons.org/licenses/by-sa/4.0/); derived features, same license",
    "attribution": "Free Spoken Digit Dataset (FSDD), github.com/Jakobovski/free-spoken-digit-dataset",
    "split": "official: recordings with index 0-4 are test, 5-49 train",
    "class_names": "0,1,2,3,4,5,6,7,8,9",
}


def parse_name(name: str):
    """Return (digit, speaker, index) of a file name like '7_jackson_32.wav', or None if it is not one."""
    m = _NAME.match(os.path.basename(name))
    if m is None:
        return None
    return int(m.group(1)), m.group(2), int(m.group(3))


def _decode_wav(data: bytes, name: str) -> tuple[np.ndarray, int]:
    try:
        with wave.open(io.BytesIO(data)) as w:
            if w.getsampwidth() != 2 or w.getnchannels() != 1:
                raise DataError(f"{name}: expected mono 16-bit PCM, got {w.getnchannels()} channels, "
                                f"{8 * w.getsampwidth()}-bit")
            rate = w.getframerate()
            samples = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    except (wave.Error, EOFError) as exc:
        raise DataError(f"{name}: not a readable WAV file: {exc}") from None
    return samples, rate


def read_recordings(path, *, only=None):
    """Yield (stem, samples int16 [n], sample_rate) for each FSDD wav in a .tar.gz or folder, sorted by name.

    only: optional set of stems (e.g. {'7_jackson_32'}) to read; others are skipped without decoding.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder (expected recordings.tar.gz or a folder of FSDD wav files)")
    if os.path.isdir(path):
        names = sorted(n for n in os.listdir(path) if parse_name(n))
        for n in names:
            stem = n[:-4]
            if only is None or stem in only:
                with open(os.path.join(path, n), "rb") as fh:
                    yield (stem, *_decode_wav(fh.read(), os.path.join(path, n)))
        return
    # Read in archive order (a .tar.gz cannot seek backwards without decompressing again), then sort by name;
    # the whole FSDD is 21 MB of wav data.
    found = {}
    try:
        with tarfile.open(path, "r:*") as tar:
            for m in tar:
                stem = os.path.basename(m.name)[:-4]
                if m.isfile() and parse_name(m.name) and (only is None or stem in only):
                    found[stem] = (tar.extractfile(m).read(), f"{path}:{m.name}")
    except (tarfile.TarError, EOFError, OSError) as exc:
        raise DataError(f"{path}: not a readable tar archive of FSDD recordings: {exc}") from None
    for stem in sorted(found):
        yield (stem, *_decode_wav(*found[stem]))


def fsdd_features(path, cfg: LogMelConfig = LogMelConfig(), *, only=None):
    """Return {'train': (x, y, stems), 'test': (x, y, stems)} in name order: x float32 [N, 1, n_mels, frames]."""
    splits = {"train": ([], [], []), "test": ([], [], [])}
    for stem, samples, rate in read_recordings(path, only=only):
        if rate != cfg.sample_rate:
            raise DataError(f"{stem}.wav: sample rate {rate} Hz, expected {cfg.sample_rate} Hz")
        digit, _speaker, index = parse_name(stem + ".wav")
        xs, ys, stems = splits["test" if index in TEST_INDICES else "train"]
        xs.append(log_mel(samples, cfg)[None])
        ys.append(digit)
        stems.append(stem)
    out = {}
    for split, (xs, ys, stems) in splits.items():
        x = np.stack(xs) if xs else np.zeros((0, 1, cfg.n_mels, cfg.frames), np.float32)
        out[split] = (x, np.asarray(ys, dtype=np.int64), stems)
    return out


def convert_fsdd(recordings, out, *, frames: int = 64, dtype=np.float16, mantissa_bits=DEFAULT_MANTISSA_BITS,
                 log=print) -> dict:
    """Write the FSDD log-mel file ``out`` from ``recordings``; return {'seconds', 'bytes', 'train', 'test'}."""
    t0 = time.perf_counter()
    cfg = LogMelConfig(frames=frames)
    feats = fsdd_features(recordings, cfg)
    xtr, ytr, ntr = feats["train"]
    xte, yte, nte = feats["test"]
    if len(ytr) == 0 or len(yte) == 0:
        raise DataError(f"{recordings}: found {len(ytr)} training and {len(yte)} test recordings; "
                        "expected FSDD files named {digit}_{speaker}_{index}.wav")
    order = balanced_order(ytr, ORDER_SEED)
    attrs = dict(FSDD_ATTRS, n_classes=10, order_seed=ORDER_SEED, **cfg.attrs())
    if dtype != np.float16:
        mantissa_bits = None
    write_dataset(out, (xtr[order], ytr[order]), (xte, yte), attrs, dtype=dtype, mantissa_bits=mantissa_bits,
                  names=([ntr[i] for i in order], nte))
    result = dict(seconds=time.perf_counter() - t0, bytes=os.path.getsize(out), train=len(ytr), test=len(yte))
    log(f"wrote {out}: {result['train']} train + {result['test']} test rows, 1x{cfg.n_mels}x{cfg.frames} "
        f"{np.dtype(dtype).name}{'' if mantissa_bits is None else f' ({mantissa_bits} mantissa bits)'}, "
        f"{result['bytes'] / 1e6:.2f} MB in {result['seconds']:.1f} s")
    return result
