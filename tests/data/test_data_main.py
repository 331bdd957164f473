"""The converters behind ``python -m asyncsgd.data``: fsdd (wav folder), mnist (when present), synthetic, errors."""
import gzip
import os
import subprocess
import sys
import wave

import numpy as np
import pytest

from asyncsgd.data import open_source
from asyncsgd.data.features import LogMelConfig, log_mel
from paths import REPO, repo_env

MNIST_DIR = os.path.join(REPO, "..", "shared", "data", "mnist")


def data_cli(*args, timeout=120):
    """Run ``python -m asyncsgd.data ARGS``; return the CompletedProcess."""
    return subprocess.run([sys.executable, "-m", "asyncsgd.data", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, cwd=REPO, env=repo_env())


def write_wav(path, samples, rate=8000):
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(np.asarray(samples, dtype="<i2").tobytes())


def fake_recording(digit, index, n=3000):
    """A chirp whose pitch depends on the digit, different per index (a stand-in for a spoken digit)."""
    t = np.arange(n) / 8000
    f = 200 + 150 * digit + 10 * index
    return (6000 * np.sin(2 * np.pi * f * t * (1 + 0.5 * t)) * np.hanning(n)).astype(np.int16)


@pytest.fixture
def wav_folder(tmp_path):
    folder = tmp_path / "recordings"
    folder.mkdir()
    for digit in range(10):
        for index in (0, 3, 5, 9):          # 0 and 3 are test, 5 and 9 are train
            write_wav(folder / f"{digit}_alice_{index}.wav", fake_recording(digit, index))
    (folder / "notes.txt").write_text("not a recording\n")
    return folder


def test_fsdd_cli_from_wav_folder(wav_folder, tmp_path):
    out = tmp_path / "small.h5"
    res = data_cli("fsdd", "--recordings", wav_folder, "--out", out)
    assert res.returncode == 0, res.stderr
    assert "20 train + 20 test rows" in res.stdout
    src = open_source(str(out))
    assert (src.n_train, src.n_test, src.input_shape) == (20, 20, (1, 40, 64))
    assert src.attrs["n_mels"] == 40 and src.attrs["hop_ms"] == 10.0 and "CC BY-SA 4.0" in src.attrs["license"]
    import h5py
    with h5py.File(out, "r") as f:
        train_names = [n.decode() for n in f["train/names"][...]]
        test_names = [n.decode() for n in f["test/names"][...]]
    assert sorted(int(n.split("_")[2]) for n in test_names) == [0] * 10 + [3] * 10
    assert sorted(int(n.split("_")[2]) for n in train_names) == [5] * 10 + [9] * 10
    x, y = src.train_range(0, 20)
    for row, name in enumerate(train_names):
        digit, _, index = name.split("_")
        assert y[row] == int(digit)
        want = log_mel(fake_recording(int(digit), int(index)), LogMelConfig())
        np.testing.assert_allclose(x[row, 0], want, rtol=2 ** -10, atol=1e-3)    # float16 storage
    assert np.bincount(y[:10], minlength=10).tolist() == [1] * 10                 # class-balanced order


def test_fsdd_cli_errors(wav_folder, tmp_path):
    res = data_cli("fsdd", "--recordings", tmp_path / "nowhere", "--out", tmp_path / "x.h5")
    assert res.returncode == 2 and "no such file or folder" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    write_wav(wav_folder / "1_bob_7.wav", fake_recording(1, 7), rate=16000)
    res = data_cli("fsdd", "--recordings", wav_folder, "--out", tmp_path / "x.h5")
    assert res.returncode == 2 and "1_bob_7.wav: sample rate 16000 Hz, expected 8000 Hz" in res.stderr
    assert not (tmp_path / "x.h5").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    res = data_cli("fsdd", "--recordings", empty, "--out", tmp_path / "x.h5")
    assert res.returncode == 2 and "found 0 training and 0 test recordings" in res.stderr


def test_synthetic_cli_matches_in_memory(tmp_path):
    out = tmp_path / "syn.h5"
    res = data_cli("synthetic", "--n", 1000, "--out", out)
    assert res.returncode == 0, res.stderr
    on_disk, in_memory = open_source(str(out)), open_source("synthetic:1000")
    assert (on_disk.n_train, on_disk.n_test) == (1000, 200)
    for a, b in zip(on_disk.train_slice(1, 3) + on_disk.test_set(), in_memory.train_slice(1, 3) + in_memory.test_set()):
        np.testing.assert_array_equal(a, b)
    check = data_cli("check", out)
    assert check.returncode == 0 and "train 1000 rows, test 200 rows, input 1x40x64 float32" in check.stdout


def test_usage_errors_exit_2(tmp_path):
    res = data_cli("synthetic", "--n", 0, "--out", tmp_path / "s.h5")
    assert res.returncode == 2 and "must be a positive integer" in res.stderr
    res = data_cli("mnist", "--idx-dir", tmp_path, "--out", tmp_path / "m.h5")
    assert res.returncode == 2 and "train-images-idx3-ubyte.gz: no such file" in res.stderr
    res = data_cli("check", "synthetic:-4")
    assert res.returncode == 2 and res.stderr.startswith("error: synthetic:-4: N must be a positive integer")


def test_mnist_truncated_idx(tmp_path):
    for name, payload in (("train-images-idx3-ubyte.gz", b"\0\0\x08\x03" + np.array([5, 28, 28], ">u4").tobytes()
                           + bytes(784 * 3)),
                          ("train-labels-idx1-ubyte.gz", b"\0\0\x08\x01" + np.array([5], ">u4").tobytes() + bytes(5))):
        with gzip.open(tmp_path / name, "wb") as fh:
            fh.write(payload)
    res = data_cli("mnist", "--idx-dir", tmp_path, "--out", tmp_path / "m.h5")
    assert res.returncode == 2 and "truncated: expected 3920 bytes of data, found 2352" in res.stderr


@pytest.mark.skipif(not os.path.isdir(MNIST_DIR), reason="MNIST IDX files not present beside the repository")
def test_mnist_cli_full_conversion(tmp_path):
    out = tmp_path / "mnist.h5"
    # uncompressed float16: gzip would dominate the run time (94 MB to write instead of 19 MB, but ~1 s)
    res = data_cli("mnist", "--idx-dir", MNIST_DIR, "--out", out, "--float16", "--gzip", 0)
    assert res.returncode == 0, res.stderr
    src = open_source(str(out))
    assert (src.n_train, src.n_test, src.input_shape, src.n_classes) == (60000, 10000, (1, 28, 28), 10)
    xt, yt = src.test_set()
    assert yt[:10].tolist() == [7, 2, 1, 0, 4, 1, 4, 9, 5, 9]        # the published first test labels
    import h5py
    with h5py.File(out, "r") as f:                                   # labels only: no feature decompression
        y = f["train/y"][...]
    assert np.bincount(y).tolist() == [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
    share = np.bincount(y) / len(y)
    for part in range(6):                                             # each worker's slice has the global class mix
        assert np.abs(np.bincount(y[part * 10000:(part + 1) * 10000], minlength=10) / 10000 - share).max() < 0.001
    assert xt.min() == 0.0 and xt.max() == 1.0 and xt.dtype == np.float32
    with gzip.open(os.path.join(MNIST_DIR, "t10k-images-idx3-ubyte.gz")) as fh:
        first = np.frombuffer(fh.read(16 + 784), np.uint8, offset=16).reshape(28, 28)
    np.testing.assert_allclose(xt[0, 0], first / 255.0, rtol=2 ** -11)


@pytest.mark.skipif(not os.path.isdir(MNIST_DIR), reason="MNIST IDX files not present beside the repository")
def test_mnist_cli_limit(tmp_path):
    out = tmp_path / "mnist_small.h5"
    res = data_cli("mnist", "--idx-dir", MNIST_DIR, "--out", out, "--limit", 500)
    assert res.returncode == 0, res.stderr
    src = open_source(str(out))
    assert (src.n_train, src.n_test) == (500, 500) and src.attrs["limit"] == 500
    assert src.attrs["storage_dtype"] == "float32"
    import h5py
    with h5py.File(out, "r") as f:
        assert f["train/x"].compression == "gzip"
