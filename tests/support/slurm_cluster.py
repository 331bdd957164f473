"""Start a real one-node SLURM cluster (Debian's slurmctld, slurmd, munge) in a temporary folder, for tests.

Nothing is installed system-wide but the packages: the munge key, slurm.conf, state, spool, logs and sockets all
live in the given folder, the daemons run in the foreground as children of this process (no systemd), and
``stop()`` ends exactly the processes it started, by PID.  Client commands find the cluster through ``SLURM_CONF``
(see ``SlurmCluster.env``).

The node declares more CPUs than the machine has (``SlurmdParameters=config_overrides``), so a 6-task job fits a
2-core test machine, and 8 generic 'gpu' resources without devices, so GPU job scripts (``--gpus-per-task``) are
scheduled on a machine without GPUs.  Process tracking is ``proctrack/linuxproc`` and tasks are not bound
(``task/none``): no cgroups are needed, so it runs in containers.
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import time

__all__ = ["SlurmCluster", "slurm_unavailable", "write_fake_gpus", "SLURM_PACKAGES"]

SLURM_PACKAGES = ("slurmctld", "slurmd", "slurm-client", "munge")
_PROGRAMS = ("slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "munged")
_SBIN = ("/usr/sbin", "/sbin", "/usr/local/sbin")
# Variables of an enclosing launcher (mpiexec, an outer SLURM job) that must not reach the jobs.
_LAUNCHER_PREFIXES = ("PMI_", "PMIX_", "HYDRA_", "HYDI_", "MPI_LOCAL", "MPIR_", "MPIEXEC_", "OMPI_", "PRTE_",
                      "SLURM_", "SRUN_", "SBATCH_")
_FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
             "BOOT_FAIL", "DEADLINE"}


def _which(name: str) -> str | None:
    path = os.pathsep.join([os.environ.get("PATH", ""), *_SBIN])
    return shutil.which(name, path=path)


def slurm_unavailable(install: bool = True) -> str | None:
    """Return None when SLURM and munge are ready to use, else the reason they are not.

    With ``install``, a root user with apt-get installs the Debian packages first (once: installed programs are
    found and nothing is downloaded again).
    """
    missing = [p for p in _PROGRAMS if _which(p) is None]
    if not missing:
        return None if os.geteuid() == 0 else "slurmd must run as root to start jobs as the submitting user"
    if not install:
        return f"SLURM programs missing: {', '.join(missing)}"
    if os.geteuid() != 0:
        return f"SLURM programs missing ({', '.join(missing)}) and not root, so cannot apt-get install them"
    if _which("apt-get") is None:
        return f"SLURM programs missing ({', '.join(missing)}) and no apt-get to install them"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for cmd in (["apt-get", "update", "-q"],
                ["apt-get", "install", "-y", "-q", "--no-install-recommends", *SLURM_PACKAGES]):
        try:
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        except subprocess.TimeoutExpired:
            return f"{' '.join(cmd)} took over 600 s"
        if out.returncode != 0:
            return f"{' '.join(cmd)} failed: {(out.stderr or out.stdout).strip()[-500:]}"
    missing = [p for p in _PROGRAMS if _which(p) is None]
    return f"installed {' '.join(SLURM_PACKAGES)} but still missing {', '.join(missing)}" if missing else None


def _die_with_parent() -> None:
    """In a child before exec: ask Linux to SIGTERM it when its parent dies, so a test killed by a timeout
    (SIGKILL, no finally blocks) leaves no daemon behind."""
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def write_fake_gpus(folder: str, gpus: int) -> None:
    """Write ``folder``/gres.conf declaring ``gpus`` device-less 'gpu' resources (every node may share the file).

    SLURM drops GPUs without device files, and wants character devices: links to /dev/null stand in.  A job then
    gets CUDA_VISIBLE_DEVICES set as on a GPU node, but no GPU behind it.
    """
    os.makedirs(os.path.join(folder, "dev"), exist_ok=True)
    for i in range(gpus):
        link = os.path.join(folder, "dev", f"fakegpu{i}")
        if not os.path.lexists(link):
            os.symlink("/dev/null", link)
    with open(os.path.join(folder, "gres.conf"), "w") as f:
        f.write(f"Name=gpu File={folder}/dev/fakegpu[0-{gpus - 1}]\n" if gpus else "")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SlurmCluster:
    """A one-node SLURM cluster rooted at ``workdir``; use as a context manager (stops its daemons on exit).

    cpus: CPUs the node declares (more than the machine has is fine); gpus: generic 'gpu' resources declared.
    """

    def __init__(self, workdir, *, cpus: int = 8, gpus: int = 8, node: str = "localhost"):
        self.dir = os.path.abspath(os.fspath(workdir))
        self.cpus, self.gpus, self.node = cpus, gpus, node
        self.conf = os.path.join(self.dir, "slurm.conf")
        self.munge_socket = os.path.join(self.dir, "munge", "munge.socket")
        self._procs: list[tuple[str, subprocess.Popen]] = []

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def start(self, timeout: float = 60) -> "SlurmCluster":
        """Start munged, slurmctld and slurmd; return once the node accepts jobs (or raise RuntimeError)."""
        try:
            self._start_munge(timeout)
            self._write_config()
            self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", self.conf])
            self._spawn("slurmd", [_which("slurmd"), "-D", "-N", self.node, "-f", self.conf])
            self._wait_node_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Cancel remaining jobs, then end the daemons this object started (SIGTERM, then SIGKILL), by PID."""
        if any(name == "slurmctld" and p.poll() is None for name, p in self._procs):
            with contextlib.suppress(Exception):
                subprocess.run([_which("scancel"), "--full", "--user", str(os.getuid())], env=self.env(),
                               capture_output=True, timeout=10)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and self.squeue():
                    time.sleep(0.5)
        for name, proc in reversed(self._procs):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(timeout=10)
        self._procs.clear()

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # -- clients -----------------------------------------------------------------------------------------------
    def env(self, extra: dict | None = None) -> dict:
        """Return an environment whose SLURM commands talk to this cluster (jobs inherit it, sbatch --export=ALL).

        A caller running under mpiexec or inside another SLURM job would hand its launcher's variables (PMI_FD,
        SLURM_JOB_ID, ...) to the jobs, whose MPI would then talk to the wrong launcher: they are left out.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES)}
        env.update({"SLURM_CONF": self.conf, **(extra or {})})
        env["PATH"] = os.pathsep.join([env.get("PATH", ""), *_SBIN])
        return env

    def sbatch(self, script, args=(), *, sbatch_options=(), env: dict | None = None, cwd=None) -> int:
        """Submit ``script args...`` with sbatch; return the job id. Output goes to <workdir>/job-<id>.out."""
        cmd = [_which("sbatch"), "--parsable", f"--output={self.dir}/job-%j.out", *sbatch_options,
               os.fspath(script), *args]
        out = subprocess.run(cmd, env=self.env(env), cwd=cwd, capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed ({out.returncode}): {out.stderr.strip()}")
        return int(out.stdout.strip().split(";")[0])

    def job_state(self, job_id: int) -> str:
        """Return the job's state (PENDING, RUNNING, COMPLETED, FAILED, ...) from scontrol."""
        out = subprocess.run([_which("scontrol"), "show", "job", "-o", str(job_id)], env=self.env(),
                             capture_output=True, text=True, timeout=30)
        m = re.search(r"\bJobState=(\S+)", out.stdout)
        if m is None:
            raise RuntimeError(f"scontrol show job {job_id}: {out.stderr.strip() or out.stdout.strip()}")
        return m.group(1)

    def wait(self, job_id: int, timeout: float) -> str:
        """Poll until the job finishes; return its final state, or 'TIMEOUT_WAITING' (job cancelled) on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in _FINISHED:
                return state
            self._check_daemons()
            time.sleep(0.5)
        subprocess.run([_which("scancel"), str(job_id)], env=self.env(), capture_output=True, timeout=30)
        return "TIMEOUT_WAITING"

    def output(self, job_id: int) -> str:
        path = os.path.join(self.dir, f"job-{job_id}.out")
        return open(path, encoding="utf-8", errors="replace").read() if os.path.exists(path) else ""

    def squeue(self) -> list[str]:
        out = subprocess.run([_which("squeue"), "-h", "-o", "%i %T"], env=self.env(), capture_output=True,
                             text=True, timeout=30)
        return out.stdout.split("\n")[:-1] if out.returncode == 0 else []

    def logs(self) -> str:
        """Return the tails of the daemons' logs (for failure messages)."""
        parts = []
        for name in ("munged.log", "slurmctld.log", "slurmd.log"):
            path = os.path.join(self.dir, name)
            if os.path.exists(path):
                parts.append(f"--- {name}\n" + "".join(open(path, errors="replace").readlines()[-30:]))
        return "\n".join(parts)

    # -- internals ---------------------------------------------------------------------------------------------
    def _spawn(self, name: str, cmd: list) -> subprocess.Popen:
        log = open(os.path.join(self.dir, f"{name}.stderr"), "w")
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                env=self.env(), start_new_session=True, preexec_fn=_die_with_parent)
        log.close()
        self._procs.append((name, proc))
        return proc

    def _check_daemons(self) -> None:
        for name, proc in self._procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode}\n{self.logs()}")

    def _start_munge(self, timeout: float) -> None:
        mdir = os.path.dirname(self.munge_socket)
        os.makedirs(mdir, mode=0o700, exist_ok=True)
        key = os.path.join(mdir, "munge.key")
        with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(os.urandom(1024))
        # --force: the temporary folder's parents (/tmp) are world-writable, which munged refuses otherwise.
        self._spawn("munged", [_which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                               f"--key-file={key}", f"--log-file={self.dir}/munged.log",
                               f"--pid-file={mdir}/munged.pid", f"--seed-file={mdir}/munged.seed"])
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.munge_socket):
            self._check_daemons()
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged did not create its socket in {timeout:.0f} s\n{self.logs()}")
            time.sleep(0.1)

    def _write_config(self) -> None:
        for sub in ("state", "spool"):
            os.makedirs(os.path.join(self.dir, sub), exist_ok=True)
        d = self.dir
        lines = [
            "ClusterName=asyncsgdtest",
            f"SlurmctldHost={socket.gethostname()}(127.0.0.1)",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.munge_socket}",
            f"SlurmctldPort={_free_port()}", f"SlurmdPort={_free_port()}",
            f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool",
            f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmdPidFile={d}/slurmd.pid",
            f"SlurmctldLogFile={d}/slurmctld.log", f"SlurmdLogFile={d}/slurmd.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SchedulerType=sched/builtin", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides", "ReturnToService=2", "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none", f"PlugStackConfig={d}/plugstack.conf",
            "SlurmctldTimeout=30", "SlurmdTimeout=30", "MinJobAge=600", "KillWait=5",
            # Job ids unique across clusters on one machine: MPI names its shared-memory segments after the
            # job and step ids, and two test clusters both running a job 1.0 collided there and hung.
            f"FirstJobId={random.randrange(1000, 60_000_000, 1000)}",
            "GresTypes=gpu",
            f"NodeName={self.node} NodeAddr=127.0.0.1 CPUs={self.cpus} "
            f"{f'Gres=gpu:{self.gpus} ' if self.gpus else ''}State=UNKNOWN",
            f"PartitionName=test Nodes={self.node} Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES",
        ]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        write_fake_gpus(d, self.gpus)
        open(os.path.join(d, "plugstack.conf"), "w").close()

    def _wait_node_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        state = "?"
        while time.monotonic() < deadline:
            self._check_daemons()
            out = subprocess.run([_which("scontrol"), "show", "node", "-o", self.node], env=self.env(),
                                 capture_output=True, text=True, timeout=30)
            m = re.search(r"\bState=(\S+)", out.stdout)
            state = m.group(1) if m else out.stderr.strip()
            if m and state.split("+")[0] in ("IDLE", "MIXED", "ALLOCATED"):
                return
            if m and ("INVAL" in state or "DRAIN" in state):  # a configuration error: waiting will not help
                break
            time.sleep(0.3)
        raise RuntimeError(f"node {self.node} not ready (state {state})\n{self.logs()}")
