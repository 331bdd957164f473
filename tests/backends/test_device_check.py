"""benchmarks/device_check.sh, the prepared run for a lent GPU machine, keeps working where there is no GPU.

Its cheapest steps run here as in ``--cpu-dry-run``: preflight (versions, an mpiexec probe) and bench_gpu, whose
rehearsal without a GPU expects bench_gpu.py's exit status 2.  The summary files must be written with a status for
every step, a failing step must not stop the next one, and the wheel-set check must catch what would stop the
install on the machine.  The GPU and scaling steps themselves are rehearsed by hand (docs/DEVICE.md).
"""
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
import zipfile

import pytest

from paths import REPO as ROOT

SCRIPT = os.path.join(ROOT, "benchmarks", "device_check.sh")
STEPS = ["install", "preflight", "kernels", "gpu_downpour", "bench_gpu", "scaling", "tta", "cpu_downpour"]


def _run(out, *args, wheels):
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", SCRIPT, str(out), "--cpu-dry-run", "--wheels", str(wheels), *args],
                          capture_output=True, text=True, env=env, timeout=240)


def _summary(out):
    with open(out / "summary.json") as f:
        summary = json.load(f)
    return summary, {s["name"]: s for s in summary["steps"]}


def test_dry_run_writes_a_summary_with_every_step(tmp_path):
    out = tmp_path / "out"
    done = _run(out, "--steps", "preflight,bench_gpu", wheels=tmp_path / "no-wheels")
    assert done.returncode == 0, done.stdout + done.stderr
    summary, steps = _summary(out)
    assert [s["name"] for s in summary["steps"]] == STEPS
    assert summary["mode"] == "cpu-dry-run"
    assert steps["preflight"]["status"] == "ok"
    assert summary["versions"]["python"] == ".".join(map(str, sys.version_info[:3]))
    assert "MPI" in summary["versions"]["mpi_library"]
    bench = steps["bench_gpu"]
    assert bench["status"] == "skipped" and bench["figures"] == {"rehearsal": "ok"}, bench
    assert all(steps[n]["status"] == "skipped" and "not selected" in steps[n]["reason"]
               for n in STEPS if n not in ("preflight", "bench_gpu"))
    md = (out / "summary.md").read_text()
    assert "| preflight | ok |" in md and "| bench_gpu | skipped |" in md and "| tta | skipped |" in md
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = tar.getnames()
    assert "logs/preflight.log" in names and "logs/bench_gpu.log" in names
    assert steps["preflight"]["reason"] is None      # without a GPU the dry run's preflight reports no problem


def test_a_failing_step_does_not_stop_the_next(tmp_path):
    out = tmp_path / "out"
    done = _run(out, "--steps", "preflight,bench_gpu", "--timeout", "preflight=0.01", wheels=tmp_path / "none")
    assert done.returncode == 1, done.stdout + done.stderr
    _, steps = _summary(out)
    assert steps["preflight"]["status"] == "failed"
    assert "killed after" in (out / "logs" / "preflight.log").read_text()
    assert steps["bench_gpu"]["status"] == "skipped" and steps["bench_gpu"]["figures"] == {"rehearsal": "ok"}


def test_bad_arguments_exit_2(tmp_path):
    done = _run(tmp_path / "out", "--steps", "preflight,warp_drive", wheels=tmp_path)
    assert done.returncode == 2
    assert "unknown step(s) warp_drive" in done.stderr
    assert not (tmp_path / "out").exists()


def _load_driver():
    spec = importlib.util.spec_from_file_location("device_check", os.path.join(ROOT, "benchmarks", "device_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _wheel(folder, name, version, requires=()):
    path = folder / f"{name}-{version}-py3-none-any.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)
    return str(path)


def test_wheel_set_check_finds_duplicates_and_missing_dependencies(tmp_path):
    pytest.importorskip("packaging")
    check = _load_driver().check_wheel_set
    good = [_wheel(tmp_path, "pytest_timeout", "2.4.0", ["pytest>=7.0.0"]),
            _wheel(tmp_path, "pytest", "9.2.0", ['tomli>=2; python_version < "3.11"', "colorama; extra == 'x'"]),
            _wheel(tmp_path, "h5py", "3.16.0", ["numpy>=1.21"])]
    assert check(good) == []
    twice = good + [_wheel(tmp_path, "pytest", "8.0.0")]
    assert any("two wheels of pytest" in p for p in check(twice))
    missing = good + [_wheel(tmp_path, "pytest_mpi", "0.6", ["pytest", "mpi4py>=3"])]
    assert check(missing) == ["pytest-mpi needs mpi4py>=3, which no carried wheel provides"]
