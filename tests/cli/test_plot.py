"""python -m asyncsgd.plot: PNG from synthetic logs, clear errors on bad input."""
import json
import os
import subprocess
import sys

import pytest

from paths import REPO

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_log(path, n_workers, seed):
    with open(path, "w") as f:
        for i in range(1, 9):
            f.write(json.dumps(dict(time=2.0 * i, samples=500 * i, loss=2.3 / i, test_accuracy=0.1 * i + 0.01 * seed,
                                    samples_per_s=250.0, per_worker_samples_per_s=[50.0 + w for w in range(n_workers)],
                                    staleness_mean=1.5, staleness_hist=[i, 2 * i, i], push_density=0.1,
                                    bytes_moved=1000 * i)) + "\n")


def run_plot(*args):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", ""), "MPLBACKEND": "Agg"}
    return subprocess.run([sys.executable, "-m", "asyncsgd.plot", *map(str, args)], capture_output=True, text=True,
                          env=env, timeout=120)


def test_plot_overlays_runs(tmp_path):
    pytest.importorskip("matplotlib")
    a, b = tmp_path / "run_a.jsonl", tmp_path / "run_b.jsonl"
    write_log(a, 5, 0)
    write_log(b, 3, 1)
    out = tmp_path / "curves.png"
    proc = run_plot(a, b, "-o", out)
    assert proc.returncode == 0, proc.stderr
    data = out.read_bytes()
    assert data[:8] == PNG_MAGIC and len(data) > 10_000
    assert "2 runs" in proc.stdout


def test_staleness_counts_cumulative_or_per_interval():
    from asyncsgd.plot import staleness_counts
    assert staleness_counts([{"staleness_hist": [1, 2]}, {"staleness_hist": [2, 3, 1]}]) == [2, 3, 1]
    assert staleness_counts([{"staleness_hist": [3, 2]}, {"staleness_hist": [1, 0, 1]}]) == [4, 2, 1]
    assert staleness_counts([{"loss": 1.0}]) == []


@pytest.mark.parametrize("content,message", [("", "no records"), ("this is not json\n", "bad.jsonl:1"),
                                             (None, "missing.jsonl")])
def test_bad_logs_are_clear_errors(tmp_path, capsys, content, message):
    from asyncsgd.plot import main
    log = tmp_path / ("missing.jsonl" if content is None else "bad.jsonl")
    if content is not None:
        log.write_text(content)
    with pytest.raises(SystemExit) as exc:
        main([str(log), "-o", str(tmp_path / "x.png")])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_missing_matplotlib_is_a_clear_error(tmp_path):
    log = tmp_path / "a.jsonl"
    write_log(log, 2, 0)
    # A module named matplotlib that fails to import stands in for an environment without it.
    fake = tmp_path / "fake"
    (fake / "matplotlib").mkdir(parents=True)
    (fake / "matplotlib" / "__init__.py").write_text("raise ImportError('no matplotlib here')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(fake), REPO])}
    proc = subprocess.run([sys.executable, "-m", "asyncsgd.plot", str(log), "-o", str(tmp_path / "x.png")],
                          capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2 and "pip install 'asyncsgd[plot]'" in proc.stderr
