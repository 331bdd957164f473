"""Metrics log, progress display and model files (asyncsgd.io): serial tests."""
import io
import json
import os

import numpy as np
import pytest

from asyncsgd.io import ProgressLine, Reporter, write_json_atomic
from asyncsgd.model.files import read_model, save_model
from asyncsgd.io.metrics import read_log
from asyncsgd.io.progress_line import format_duration, format_record


class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


class FakePipe(io.StringIO):
    def isatty(self):
        return False


RECORD = dict(time=12.0, samples=3000, loss=0.4321, test_accuracy=0.9633, samples_per_s=250.0,
              per_worker_samples_per_s=[50.0] * 5, staleness_mean=2.25, staleness_hist=[1, 2, 3])


def test_terminal_rewrites_one_line():
    out = FakeTerminal()
    rep = Reporter(progress="auto", stream=out, total={"samples": 6000})
    rep.record(RECORD)
    rep.record({**RECORD, "time": 24.0, "samples": 6000, "loss": 0.1})
    rep.close()
    text = out.getvalue()
    assert text.count("\r") >= 2 and text.count("\n") == 1 and text.endswith("\n")
    first = text.split("\r")[1]
    for piece in ("samples 3.0k", "250/s", "loss 0.4321", "acc 0.9633", "stale 2.2", "50% ETA 0:12"):
        assert piece in first, (piece, first)
    assert "loss 0.1000" in text.split("\r")[-1] and "100% ETA 0:00" in text


def test_terminal_message_keeps_live_line():
    out = FakeTerminal()
    rep = Reporter(stream=out)
    rep.record(RECORD)
    rep.message("checkpoint written")
    rep.close()
    text = out.getvalue()
    # The message sits on its own line and the live line is drawn again after it.
    before, after = text.split("checkpoint written\n")
    assert before.endswith("\r") and "acc 0.9633" in after
    assert "acc 0.9633" in before


def test_pipe_prints_one_plain_line_per_record():
    out = FakePipe()
    rep = Reporter(stream=out)
    rep.record(RECORD)
    rep.message("note")
    rep.record({"time": 1.0, "iteration": 7, "loss": 1.5})
    rep.close()
    lines = out.getvalue().split("\n")
    assert "\r" not in out.getvalue()
    assert lines[0].startswith("[0:12]") and "acc 0.9633" in lines[0]
    assert lines[1] == "note" and "it 7" in lines[2] and "loss 1.5000" in lines[2] and lines[3] == ""


def test_progress_none_prints_nothing_but_logs(tmp_path):
    out = FakeTerminal()
    log = tmp_path / "m.jsonl"
    with Reporter(log, progress="none", stream=out) as rep:
        rep.record({"samples": 1, "loss": np.float32(0.5), "staleness_hist": np.arange(3)})
        rep.message("hidden")
    assert out.getvalue() == ""
    (rec,) = read_log(log)
    assert rec["loss"] == pytest.approx(0.5) and rec["staleness_hist"] == [0, 1, 2] and rec["time"] >= 0


def test_log_is_flushed_per_record_and_append_continues(tmp_path):
    log = tmp_path / "m.jsonl"
    rep = Reporter(log, progress="none")
    rep.record({"samples": 1, "loss": float("nan")})
    # Readable before close: a killed run keeps its curve.
    assert json.loads(log.read_text().splitlines()[0])["loss"] is None
    rep.close()
    with Reporter(log, progress="none", append=True) as rep:
        rep.record({"samples": 2})
    assert [r["samples"] for r in read_log(log)] == [1, 2]
    with Reporter(log, progress="none") as rep:
        rep.record({"samples": 3})
    assert [r["samples"] for r in read_log(log)] == [3]


def test_bad_progress_mode_and_total():
    with pytest.raises(ValueError, match="progress mode"):
        ProgressLine(FakePipe(), "fancy")
    with pytest.raises(ValueError, match="unknown key"):
        ProgressLine(FakePipe(), "lines", total={"epochs": 3})


def test_eta_uses_the_first_limit_reached():
    text = format_record({"time": 10.0, "samples": 100, "iteration": 50}, {"samples": 1000, "steps": 100})
    assert "50% ETA 0:10" in text
    assert format_duration(3725) == "1:02:05" and format_duration(float("nan")) == "?"
    # A trainer that knows its own progress wins over the totals.
    assert "25% ETA 0:30" in format_record({"time": 10.0, "samples": 900, "fraction_done": 0.25}, {"samples": 1000})


def test_write_json_atomic(tmp_path):
    path = tmp_path / "summary.json"
    write_json_atomic(path, {"acc": np.float64(0.5), "hist": np.arange(2)})
    write_json_atomic(path, {"acc": 0.75})
    assert json.loads(path.read_text()) == {"acc": 0.75}
    assert os.listdir(tmp_path) == ["summary.json"]
    with pytest.raises(FileNotFoundError, match="does not exist"):
        write_json_atomic(tmp_path / "missing" / "x.json", {})


def test_read_log_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match="no records"):
        read_log(empty)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"a": 1}\nnot json\n')
    with pytest.raises(ValueError, match="bad.jsonl:2"):
        read_log(bad)


LAYOUT = [("conv1/W", 0, (4, 1, 3, 3)), ("conv1/b", 36, (4,)), ("dense/W", 40, (4, 10)), ("dense/b", 80, (10,))]


def test_model_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    params = rng.standard_normal(90).astype(np.float32)
    meta = dict(model="speech_cnn", input_shape=(1, 40, 32), n_classes=10, config={"lr": 0.01, "mode": "downpour"},
                test_accuracy=0.9633)
    path = tmp_path / "model.h5"
    save_model(path, params, LAYOUT, meta)
    loaded, got = read_model(path)
    assert loaded.dtype == np.float32 and np.array_equal(loaded, params)
    assert got["model"] == "speech_cnn" and got["input_shape"] == (1, 40, 32) and got["n_classes"] == 10
    assert got["config"] == meta["config"] and got["test_accuracy"] == 0.9633 and got["n_params"] == 90
    assert got["layout"] == LAYOUT
    import h5py
    with h5py.File(path, "r") as f:  # per-layer datasets for other tools
        assert np.array_equal(f["layers/dense.W"][...], params[40:80].reshape(4, 10))


def test_model_bad_inputs_and_files(tmp_path):
    params = np.zeros(90, np.float32)
    meta = dict(model="m", input_shape=(1, 2, 2), n_classes=2)
    with pytest.raises(ValueError, match="outside"):
        save_model(tmp_path / "x.h5", params, [("w", 80, (20,))], meta)
    with pytest.raises(ValueError, match="lacks"):
        save_model(tmp_path / "x.h5", params, LAYOUT, {"model": "m"})
    with pytest.raises(ValueError, match="does not exist"):
        read_model(tmp_path / "nothing.h5")
    junk = tmp_path / "junk.h5"
    junk.write_bytes(b"not an hdf5 file at all" * 10)
    with pytest.raises(ValueError, match="unreadable or incomplete"):
        read_model(junk)
    good = tmp_path / "good.h5"
    save_model(good, params, LAYOUT, meta)
    cut = tmp_path / "cut.h5"
    cut.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(ValueError, match="cut.h5"):
        read_model(cut)
