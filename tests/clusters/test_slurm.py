"""The SLURM job scripts in jobs/, submitted with sbatch to a real one-node cluster started for the test.

Needs root and Debian's slurmctld, slurmd, slurm-client and munge: installed with apt-get when missing (once), else
the test skips with the reason; ASYNCSGD_REQUIRE_SLURM=1 turns the skip into a failure (for CI).  The cluster lives
in a temporary folder and its daemons are stopped by PID at the end (tests/support/slurm_cluster.py).

Each script runs a small configuration through its pass-through arguments ("$@" or ASYNCSGD_ARGS) with the
Python running this test (ASYNCSGD_PYTHON); the GPU script is submitted unchanged (--gpus-per-task=1, granted from
the cluster's device-less 'gpu' resources) with ASYNCSGD_DEVICE=auto, so it trains on the CPU where no GPU exists.
With an Open MPI build of mpi4py every job uses LAUNCHER=mpirun, as Open MPI 5 has no PMI2 for srun and Debian's
slurmd here cannot load PMIx.
"""
import json
import os
import re
import signal
import sys
import time

import pytest

from asyncsgd.testing.launch import mpi_env, mpi_flavour
from paths import REPO
from slurm_cluster import SlurmCluster, slurm_unavailable

JOBS = os.path.join(REPO, "jobs")
SMALL = ["--data", "synthetic:600", "--model", "logreg", "--steps", "20"]
# the last line names the model chosen by validation accuracy when there is a validation split
ACCURACY = re.compile(r"^final test accuracy: ([01]\.\d{4})(?: \(selected model: \w+, validation [01]\.\d{4}\))?$", re.M)
WAIT_S = 150  # for all jobs together

# (name, script, sbatch options, trainer args, extra environment, text the script's banner must show)
SUBMISSIONS = [
    ("downpour_cpu", "downpour_cpu.sh", ["--ntasks=3"], SMALL, {}, "3 tasks x 1 cpus, launcher "),
    ("downpour_cpu_mpirun", "downpour_cpu.sh", ["--ntasks=3"], SMALL, {"LAUNCHER": "mpirun"}, "launcher mpirun"),
    ("downpour_gpu", "downpour_gpu.sh", ["--ntasks=3", "--cpus-per-task=1"], SMALL, {"ASYNCSGD_DEVICE": "auto"},
     "3 tasks x 1 gpu x 1 cpus, device auto"),
    ("sandblaster", "sandblaster.sh", ["--ntasks=3"], [],
     {"ASYNCSGD_ARGS": "--data synthetic:600 --max-iter 5"}, "3 tasks x 1 cpus"),
    ("multinode", "multinode.sh", ["--nodes=1", "--ntasks-per-node=3"], SMALL, {}, "1 node(s) localhost: 3 tasks"),
]


def _under_mpi_with_peers() -> bool:
    return any(os.environ.get(v, "1").isdigit() and int(os.environ.get(v, "1")) > 1
               for v in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"))


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Start the cluster, submit every script at once, wait for all; yield {name: (state, output, run_dir)}."""
    if _under_mpi_with_peers():
        pytest.skip("the SLURM test starts its own cluster: run it serially, not under mpiexec -n > 1")
    reason = slurm_unavailable(install=True)
    if reason is not None:
        if os.environ.get("ASYNCSGD_REQUIRE_SLURM") == "1":
            pytest.fail(f"ASYNCSGD_REQUIRE_SLURM=1 but SLURM is unavailable: {reason}")
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("slurm")
    # A SIGTERM (a CI step's timeout) should still stop the daemons: turn it into an exception while they run.
    try:
        previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    except ValueError:  # not the main thread: no handler, the daemons still die with this process
        previous = None
    try:
        yield _run_jobs(root)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def _run_jobs(root) -> dict:
    # The settings this MPI needs (Open MPI as root, ...), and a launcher it supports under SLURM.
    mpi_settings = mpi_env({})
    if mpi_flavour() == "openmpi":
        mpi_settings["LAUNCHER"] = "mpirun"
    results = {}
    with SlurmCluster(root / "cluster", cpus=8) as cluster:
        submitted = {}
        for name, script, options, args, env, _ in SUBMISSIONS:
            run_dir = root / name
            env = {**mpi_settings, "ASYNCSGD_PYTHON": sys.executable, "ASYNCSGD_RUN_DIR": str(run_dir),
                   "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
                   "PYTHONUNBUFFERED": "1", **env}
            job_id = cluster.sbatch(os.path.join(JOBS, script), args, sbatch_options=[f"--chdir={REPO}", *options],
                                    env=env)
            submitted[name] = (job_id, run_dir)
        deadline = time.monotonic() + WAIT_S
        for name, (job_id, run_dir) in submitted.items():
            state = cluster.wait(job_id, timeout=max(1.0, deadline - time.monotonic()))
            results[name] = (state, cluster.output(job_id), run_dir, cluster.logs())
    return results


@pytest.mark.timeout(300)
@pytest.mark.parametrize("name,script,options,args,env,banner", SUBMISSIONS, ids=[s[0] for s in SUBMISSIONS])
def test_job_script_completes(jobs, name, script, options, args, env, banner):
    state, output, run_dir, logs = jobs[name]
    assert state == "COMPLETED", f"{script} ended {state}; job output:\n{output}\ncluster logs:\n{logs}"
    assert banner in output, output
    found = ACCURACY.findall(output)
    assert len(found) == 1 and 0.0 <= float(found[0]) <= 1.0, output
    # Rank 0 wrote the outputs the script asked for into ASYNCSGD_RUN_DIR.
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert records, f"{run_dir}/metrics.jsonl is empty"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test_accuracy"] == pytest.approx(float(found[0]), abs=1e-4)
