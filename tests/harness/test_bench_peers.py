"""benchmarks/bench_peers.py as a user runs it: a --quick smoke run prints the table and writes the JSON it promises.

Nothing here is timed: the figures of a 2-second run mean nothing, only their shape is checked.  The PyTorch side
runs only where torch is installed (it is an optional benchmark dependency, never a test one).
"""
import importlib.util
import json
import os
import subprocess
import sys

import pytest

from paths import REPO

BENCH = [sys.executable, os.path.join(REPO, "benchmarks", "bench_peers.py")]
HAVE_TORCH = importlib.util.find_spec("torch") is not None


def _bench(args, timeout=240):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run(BENCH + args, capture_output=True, text=True, timeout=timeout, env=env, cwd=REPO)


def _table_row(stdout: str, name: str) -> str:
    rows = [ln for ln in stdout.splitlines() if ln.split()[:1] == [name]]
    assert len(rows) == 1, f"expected one table row for {name}:\n{stdout}"
    return rows[0]


def _check_run_shape(run: dict):
    assert run["status"] == "ok", run
    assert run["evaluations"] >= 1 and 0.0 <= run["final_test_accuracy"] <= 1.0
    assert set(run["time_to"]) == {"0.95", "0.98"}
    assert all(t is None or t > 0 for t in run["time_to"].values())


@pytest.mark.slow
def test_quick_asyncsgd_side(tmp_path):
    out = tmp_path / "peers.json"
    proc = _bench(["--quick", "--only", "downpour,serial", "--json-out", str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads(out.read_text())
    assert record["quick"] and record["repeats"] == 1 and record["targets"] == [0.95, 0.98]
    assert record["load_start"] and record["load_end"] and record["machine"]["cpus"] == os.cpu_count()
    # the default command, the first candidate rank count, serial mode: one run each, every one trained and evaluated
    assert [r["config"] for r in record["runs"]] == ["downpour-6", "downpour-3", "serial"]
    for run in record["runs"]:
        _check_run_shape(run)
    assert record["runs"][0]["command"] == "mpirun -n 6 python -m asyncsgd.train"
    assert record["best_ranks"] == "downpour-3"           # the only candidate in a quick run
    assert record["best_torch"] is None and record["goal_default_beats_best_torch_to_98"] is None
    for name, entry in record["summary"].items():
        assert entry["ok"] == entry["runs"] == 1, (name, entry)
        assert {"median_0.95", "median_0.98", "reached_0.95", "reached_0.98"} <= set(entry)
    # the printed table: a header, one row per configuration, the best rank count marked, the load beside it
    assert "configuration" in proc.stdout and "98%" in proc.stdout and "load average" in proc.stdout
    assert "python -m asyncsgd.train --mode serial" in _table_row(proc.stdout, "serial")
    assert _table_row(proc.stdout, "downpour-3").split()[1] == "*"
    _table_row(proc.stdout, "downpour-6")


@pytest.mark.skipif(HAVE_TORCH, reason="torch is installed here: the skip path cannot be seen")
def test_torch_side_skipped_with_reason_without_torch(tmp_path):
    out = tmp_path / "peers.json"
    proc = _bench(["--quick", "--only", "torch,torch-ddp", "--ddp-procs", "2", "--json-out", str(out)], timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads(out.read_text())
    assert [r["config"] for r in record["runs"]] == ["torch", "torch-ddp-2"]
    for run in record["runs"]:
        assert run["status"].startswith("skipped: torch is not installed") and "pip install torch==" in run["status"]
    assert "skipped: torch is not installed" in _table_row(proc.stdout, "torch")


@pytest.mark.slow
@pytest.mark.skipif(not HAVE_TORCH, reason="torch is not installed (optional: pip install torch==2.13.0 "
                                           "--index-url https://download.pytorch.org/whl/cpu)")
def test_quick_torch_side(tmp_path):
    out = tmp_path / "peers.json"
    proc = _bench(["--quick", "--only", "torch,torch-ddp", "--ddp-procs", "2", "--json-out", str(out)])
    assert proc.returncode == 0, proc.stdout + proc.stderr
    record = json.loads(out.read_text())
    assert [r["config"] for r in record["runs"]] == ["torch", "torch-ddp-2"]
    for run in record["runs"]:
        _check_run_shape(run)
    assert record["best_torch"] in ("torch", "torch-ddp-2")


def test_bad_arguments_exit_2():
    proc = _bench(["--ranks", "1"], timeout=60)
    assert proc.returncode == 2 and "--ranks" in proc.stderr
    proc = _bench(["--only", "tensorflow"], timeout=60)
    assert proc.returncode == 2 and "--only" in proc.stderr
