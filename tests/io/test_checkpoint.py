"""Checkpoints (asyncsgd.io.checkpoint): round trip, clear errors, and survival of a write killed half-way."""
import os
import random
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from asyncsgd.io import load_checkpoint, save_checkpoint
from paths import REPO



def make_state(n, seed):
    rng = np.random.default_rng(seed)
    return dict(
        params=rng.standard_normal(n).astype(np.float32),
        state={"adagrad_sums": rng.random(n).astype(np.float32),
               "momentum/1": rng.standard_normal(n).astype(np.float32),
               "momentum/2": rng.standard_normal(n).astype(np.float32),
               "lbfgs/rho": np.arange(5, dtype=np.float64)},
        version=1000 + seed, config={"mode": "downpour", "lr": 0.01, "seed": seed},
        data_position={"1": {"epoch": 2, "samples_seen": 640}}, seeds={"init": seed, "shuffle": [seed, 1]},
        model_name="speech_cnn", n_params=n)


def assert_same(ckpt, ref):
    assert np.array_equal(ckpt.params, ref["params"]) and ckpt.params.dtype == np.float32
    assert ckpt.state.keys() == ref["state"].keys()
    for name, value in ref["state"].items():
        assert np.array_equal(ckpt.state[name], value) and ckpt.state[name].dtype == value.dtype
    for key in ("version", "config", "data_position", "seeds", "model_name", "n_params"):
        assert getattr(ckpt, key) == ref[key], key


def test_round_trip(tmp_path):
    ref = make_state(1000, 1)
    path = tmp_path / "ckpt.h5"
    save_checkpoint(path, **ref)
    assert_same(load_checkpoint(path, expect_model="speech_cnn", expect_n_params=1000), ref)
    ref2 = make_state(1000, 2)
    save_checkpoint(path, **ref2)  # overwrite in place
    assert_same(load_checkpoint(path), ref2)
    assert sorted(os.listdir(tmp_path)) == ["ckpt.h5"]  # no temporary file left behind


def test_mismatched_model_is_a_clear_error(tmp_path):
    path = tmp_path / "ckpt.h5"
    save_checkpoint(path, **make_state(100, 0))
    with pytest.raises(ValueError, match=r"written for model speech_cnn with 100 parameters; "
                                         r"this run builds model mnist_cnn with 250"):
        load_checkpoint(path, expect_model="mnist_cnn", expect_n_params=250)
    with pytest.raises(ValueError, match="with 100 parameters"):
        load_checkpoint(path, expect_n_params=99)


def test_bad_save_arguments(tmp_path):
    ref = make_state(10, 0)
    with pytest.raises(ValueError, match="n_params=11"):
        save_checkpoint(tmp_path / "c.h5", **{**ref, "n_params": 11})
    with pytest.raises(ValueError, match="JSON"):
        save_checkpoint(tmp_path / "c.h5", **{**ref, "config": {"x": object()}})
    assert not os.listdir(tmp_path)


def test_corrupt_truncated_and_foreign_files(tmp_path):
    path = tmp_path / "ckpt.h5"
    ref = make_state(20000, 3)
    save_checkpoint(path, **ref)
    data = bytearray(path.read_bytes())

    cut = tmp_path / "cut.h5"
    cut.write_bytes(bytes(data[: len(data) // 2]))
    with pytest.raises(ValueError, match="cut.h5 is unreadable or incomplete"):
        load_checkpoint(cut)

    # Flip bytes inside the parameter data: HDF5 still opens it, the checksum catches it.
    flipped = tmp_path / "flipped.h5"
    needle = ref["params"][1000:1004].tobytes()
    at = bytes(data).find(needle)
    assert at > 0
    data[at:at + 4] = bytes(b ^ 0xFF for b in data[at:at + 4])
    flipped.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="flipped.h5 is corrupt: dataset params fails its checksum"):
        load_checkpoint(flipped)

    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"\0" * 4096)
    with pytest.raises(ValueError, match="unreadable"):
        load_checkpoint(junk)
    with pytest.raises(ValueError, match="does not exist"):
        load_checkpoint(tmp_path / "none.h5")

    from asyncsgd.model.files import save_model
    model = tmp_path / "model.h5"
    save_model(model, np.zeros(4, np.float32), [("w", 0, (4,))], dict(model="m", input_shape=(1, 2, 2), n_classes=2))
    with pytest.raises(ValueError, match="not an asyncsgd checkpoint"):
        load_checkpoint(model)


# The writer runs in a child so it can be SIGKILLed like a job at its time limit.
WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    sys.path.insert(0, sys.argv[1])
    from asyncsgd.io import checkpoint
    path, n, mode = sys.argv[2], int(sys.argv[3]), sys.argv[4]
    rng = np.random.default_rng(7)
    def stall(name):
        # Announce that the new file is half-written, then wait to be killed.
        print("mid-write", name, flush=True)
        time.sleep(60)
    if mode == "stall":
        checkpoint._after_dataset_hook = lambda name: stall(name) if name == "state/momentum/1" else None
    state = {"adagrad_sums": rng.random(n, dtype=np.float32), "momentum/1": rng.random(n, dtype=np.float32)}
    for i in range(1000000):
        checkpoint.save_checkpoint(path, params=np.full(n, i, np.float32), state=state, version=i, config={},
                                   data_position={}, seeds={}, model_name="speech_cnn", n_params=n)
        print("wrote", i, flush=True)
""")


def start_writer(path, n, mode):
    return subprocess.Popen([sys.executable, "-c", WRITER, REPO, str(path), str(n), mode],
                            stdout=subprocess.PIPE, text=True)


def test_write_killed_half_way_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.h5"
    ref = make_state(2_000_000, 5)  # 8 MB per array
    save_checkpoint(path, **ref)
    before = path.read_bytes()
    proc = start_writer(path, 2_000_000, "stall")
    try:
        line = proc.stdout.readline()
        assert line.startswith("mid-write"), line
        assert os.path.exists(tmp_path / ".ckpt.h5.tmp")  # the new file really is half-written
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert path.read_bytes() == before
    assert_same(load_checkpoint(path, expect_model="speech_cnn", expect_n_params=2_000_000), ref)
    # The next save overwrites the stale temporary file instead of leaving it behind.
    save_checkpoint(path, **make_state(2_000_000, 6))
    assert sorted(os.listdir(tmp_path)) == ["ckpt.h5"]


def test_write_killed_at_random_moments_always_leaves_a_whole_checkpoint(tmp_path):
    path = tmp_path / "ckpt.h5"
    n = 1_000_000
    rng = random.Random(11)
    for _ in range(3):
        proc = start_writer(path, n, "loop")
        try:
            assert proc.stdout.readline().startswith("wrote")  # at least one whole checkpoint exists
            time.sleep(rng.uniform(0.0, 0.3))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        ckpt = load_checkpoint(path, expect_model="speech_cnn", expect_n_params=n)
        # Whichever write finished last: its parameters are all equal to its version.
        assert np.all(ckpt.params == ckpt.version)
