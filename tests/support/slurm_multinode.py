"""A real multi-node SLURM cluster on namespace hosts, for tests: one slurmd per host, slurmctld and munged on host 0.

The hosts come from ``hosts.Hosts``: each is a network namespace on a private bridge with its own hostname
(``host0``, ``host1``, ...), which is also its SLURM NodeName, and its bridge address as NodeAddr.  Host 0 is the
head node: it runs munged (one for the whole cluster: its socket is a path on the file system every namespace
shares), slurmctld, its own slurmd, and every client command, since the machine's own namespace has no address on
the bridge.  Jobs, ``srun`` steps and MPI traffic between nodes go over real TCP between the hosts.  Nodes declare
more CPUs than the machine has and device-less 'gpu' resources, as in ``slurm_cluster.SlurmCluster``.

API (everything bounded in time; RuntimeError with the daemons' log tails when the cluster fails)::

    reason = multinode_unavailable()            # None, or why not (a skip reason): root, iproute2, SLURM packages
    with MultiNodeSlurm(workdir, n_hosts=3, cpus=4, gpus=2) as cluster:     # start(timeout=90) ... close()
        cluster.hostnames                       # ["host0", "host1", "host2"]: hostnames = NodeNames
        cluster.hosts                           # the hosts.Hosts (cluster.hosts[i].address, .netns, ...)
        cluster.env(extra)                      # environment for client commands and jobs (SLURM_CONF, PATH);
                                                #   the controller is reachable from the hosts only: run client
                                                #   commands with client()/run_client()/submit(), not directly
        cluster.job_env(python, extra)          # env(): plus what an MPI job of ``python``'s MPI needs across
                                                #   these hosts (TCP on eth0; LAUNCHER=mpirun for Open MPI),
                                                #   ASYNCSGD_PYTHON and PYTHONPATH; ``extra`` overrides any of it;
                                                #   the store stays RMA (what ULFM's fault tolerance needs)
        cluster.client(argv)                    # argv prefixed to run on the head node (scontrol, scancel, ...)
        cluster.run_client(argv, timeout=30)    # run it there; CompletedProcess (text, stdout/stderr)
        job = cluster.submit(script, args, env=None, sbatch_options=(), cwd=None)   # sbatch -> job id (int);
                                                #   output in <workdir>/job-<id>.out
        cluster.job_state(job)                  # "PENDING", "RUNNING", "COMPLETED", ... (scontrol)
        cluster.job_info(job)                   # scontrol show job as a dict (NodeList, BatchHost, ExitCode, ...)
        cluster.wait(job, timeout)              # final state, or "TIMEOUT_WAITING" (job then cancelled)
        cluster.output(job)                     # the job's output file ("" while none)
        cluster.node_state("host1")             # "IDLE", "ALLOCATED", "DOWN*", ...
        cluster.run_on(i, argv, timeout=60)     # run argv on host i (its network, hostname); CompletedProcess
        cluster.popen_on(i, argv, **popen_kw)   # start it there (killed by close())
        cluster.processes()                     # {host index: [pids in its network namespace]} (a node's
                                                #   tasks, its slurmd; on host 0 also slurmctld and munged)
        cluster.daemon_pids()                   # {"munged": pid, "slurmctld": pid, "slurmd@host0": pid, ...}
        cluster.kill_host(i, command=None)      # SIGKILL at once every process on host i except the cluster's
                                                #   daemons (or only those whose command line holds ``command``);
                                                #   [(pid, command line)] of those signalled (a node dying)
        cluster.logs()                          # tails of the daemons' logs (for failure messages)
    # close(): cancels jobs, stops the daemons by PID, then hosts.close() kills whatever is left in the hosts
    # and removes the namespaces, links, bridge and the cluster's files (which live in the hosts' folder under
    # /run, so that objects of a process killed by SIGKILL are removed by the next Hosts made, remove_stale).
    leftovers(pid)                              # what process pid's cluster left: [] when all is gone
    process_identity(pid)                       # (pid, start time) of a live process, else None

The caller's ``workdir`` only receives the jobs' output files; close() leaves it alone.  One cluster per process
(the hosts' names are the process's).
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import time

from hosts import DEVICE, NETNS_ETC, PREFIX, RUN_DIR, Hosts, _sh, mpi_flavour_of, unavailable as hosts_unavailable
from paths import REPO
from slurm_cluster import (_FINISHED, _LAUNCHER_PREFIXES, _SBIN, _die_with_parent, _which, slurm_unavailable,
                           write_fake_gpus)

__all__ = ["MultiNodeSlurm", "multinode_unavailable", "multinode_skip_reason", "leftovers", "process_identity"]

_CTLD_PORT, _SLURMD_PORT = 6817, 6818   # each host is a network namespace of its own: nothing else binds there
_STOP_S = 10                            # s a daemon gets to exit on SIGTERM before SIGKILL


def multinode_skip_reason(install: bool = True) -> str | None:
    """``multinode_unavailable``, for tests: the skip reason, or None; under ``ASYNCSGD_REQUIRE_SLURM=1`` a missing
    cluster fails the calling test instead (pytest.fail)."""
    reason = multinode_unavailable(install=install)
    if reason is not None and os.environ.get("ASYNCSGD_REQUIRE_SLURM") == "1":
        import pytest
        pytest.fail(f"ASYNCSGD_REQUIRE_SLURM=1 but a multi-node SLURM cluster cannot be made: {reason}")
    return reason


def multinode_unavailable(install: bool = True) -> str | None:
    """Return None when a multi-node cluster can be made here, else why not (a skip reason).

    With ``install``, a root user with apt-get gets the SLURM packages installed first (slurm_unavailable).
    """
    return hosts_unavailable() or slurm_unavailable(install=install)


class MultiNodeSlurm:
    """``n_hosts`` SLURM nodes on namespace hosts (see the module's docstring); a context manager.

    cpus, gpus: what each node declares (more than the machine has is fine; gpus are device-less).
    rate: the hosts' link bandwidth (hosts.Hosts), None for unlimited.
    """

    def __init__(self, workdir, n_hosts: int = 3, *, cpus: int = 4, gpus: int = 2, rate: str | None = None):
        if isinstance(n_hosts, bool) or not isinstance(n_hosts, int) or not 1 <= n_hosts <= 16:
            raise ValueError(f"n_hosts must be an integer from 1 to 16, got {n_hosts!r}")
        self.workdir = os.path.abspath(os.fspath(workdir))
        self.n_hosts, self.cpus, self.gpus = n_hosts, cpus, gpus
        self.hosts = Hosts(n_hosts, rate=rate)
        self.dir = os.path.join(self.hosts.run_dir, "slurm")   # removed with the hosts, also when stale
        self.conf = os.path.join(self.dir, "slurm.conf")
        self.munge_socket = os.path.join(self.dir, "munge", "munge.socket")
        self._daemons: list = []            # (name, Popen) in start order
        self._started = False

    @property
    def hostnames(self) -> list:
        return [h.hostname for h in self.hosts]

    # -- lifecycle ---------------------------------------------------------------------------------------------
    def __enter__(self) -> "MultiNodeSlurm":
        return self.start()

    def __exit__(self, *exc):
        self.close()
        return False

    def start(self, timeout: float = 90) -> "MultiNodeSlurm":
        """Make the hosts, start munged, slurmctld and every slurmd; return once every node accepts jobs.

        On any failure (RuntimeError with the logs), everything made so far is removed before raising.
        """
        why = multinode_unavailable(install=True)
        if why is not None:
            raise RuntimeError(f"cannot make a multi-node SLURM cluster: {why}")
        os.makedirs(self.workdir, exist_ok=True)
        self.hosts.start()
        self._started = True
        try:
            os.makedirs(self.dir)
            self._start_munge(timeout)
            self._write_config()
            self._spawn(0, "slurmctld", [_which("slurmctld"), "-D", "-i", "-f", self.conf])
            for host in self.hosts:
                # `ip netns exec` mounts a fresh /sys for the host, without the cgroup file systems, and slurmd
                # refuses to start without them (its cgroup plugin detects the version from what is mounted):
                # the machine's cgroup mounts are repeated in the host's own mount namespace first.
                self._spawn(host.index, f"slurmd@{host.hostname}",
                            ["sh", "-c", f'{_cgroup_mounts()} exec "$@"', "slurmd",
                             _which("slurmd"), "-D", "-N", host.hostname, "-f", self.conf])
            self._wait_nodes_ready(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        """Cancel the jobs, stop the daemons (SIGTERM, then SIGKILL), then remove the hosts and files; idempotent."""
        if not self._started:
            return
        try:
            if any(name == "slurmctld" and p.poll() is None for name, p in self._daemons):
                try:
                    self.run_client([_which("scancel"), "--full", "--user", str(os.getuid())], timeout=10)
                    deadline = time.monotonic() + 15
                    while time.monotonic() < deadline and self._queue():
                        time.sleep(0.5)
                except (subprocess.TimeoutExpired, OSError):
                    pass                # the hosts' close below kills the jobs' processes all the same
            # slurmds first (they end their steps), the controller, munged last: each still needs the next
            for _, proc in reversed(self._daemons):
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(timeout=_STOP_S)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait(timeout=_STOP_S)
        finally:
            self._daemons = []
            self._started = False
            self.hosts.close()          # kills what is left in every host, removes namespaces, links, /run folder

    # -- clients -----------------------------------------------------------------------------------------------
    def env(self, extra: dict | None = None) -> dict:
        """Return an environment whose SLURM commands (run on a host) talk to this cluster; jobs inherit it.

        An enclosing launcher's or SLURM job's variables (PMI_FD, SLURM_JOB_ID, ...) are left out, as in
        SlurmCluster.env.
        """
        env = {k: v for k, v in os.environ.items() if not k.startswith(_LAUNCHER_PREFIXES)}
        env.update({"SLURM_CONF": self.conf, **(extra or {})})
        env["PATH"] = os.pathsep.join([env.get("PATH", ""), *_SBIN])
        return env

    def job_env(self, python: str | None = None, extra: dict | None = None) -> dict:
        """Return ``env()`` plus what a job running ``python``'s MPI (default: this interpreter) needs on these hosts.

        Between hosts MPI must use TCP on the hosts' interface (hosts.Hosts.mpi_command says why): MPICH gets
        libfabric's tcp provider (its jobs launch with srun --mpi=pmi2); Open MPI gets ob1 over tcp and sm and
        LAUNCHER=mpirun, since Open MPI 5 has no PMI2 for srun and Debian's slurmd cannot load PMIx.  Unlike
        hosts.Hosts, the store's transport is left as a user's job has it (RMA, which ULFM's fault tolerance needs;
        pass ASYNCSGD_STORE=messages for push-heavy jobs under Open MPI), and no oversubscription policy is set:
        SLURM gives mpirun its slots, and PRRTE's ":oversubscribe" mapping put every rank on the first node.
        ``extra`` is applied last and overrides any of it.
        """
        python = python or sys.executable
        env = self.env()
        env.update({"ASYNCSGD_PYTHON": python, "PYTHONUNBUFFERED": "1",
                    "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)})
        if mpi_flavour_of(python) == "openmpi":
            env.update({"LAUNCHER": "mpirun", "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1",
                        "OMPI_MCA_osc": "^ucx",
                        "OMPI_MCA_pml": "ob1", "OMPI_MCA_btl": "self,sm,tcp",
                        "OMPI_MCA_btl_tcp_if_include": DEVICE, "OMPI_MCA_oob_tcp_if_include": DEVICE,
                        "PRTE_MCA_oob_tcp_if_include": DEVICE})
        else:
            env.update({"MPIR_CVAR_CH4_NETMOD": "ofi", "FI_PROVIDER": "tcp", "FI_TCP_IFACE": DEVICE})
        env.update(extra or {})
        return env

    def client(self, argv: list) -> list:
        """Return ``argv`` prefixed to run on the head node, where the controller's address is reachable."""
        return self.hosts[0].enter() + list(argv)

    def run_client(self, argv: list, *, timeout: float = 30, env: dict | None = None) -> subprocess.CompletedProcess:
        """Run ``argv`` on the head node with ``env()`` (plus ``env``); killed after ``timeout`` s."""
        return subprocess.run(self.client(argv), env=self.env(env), capture_output=True, text=True,
                              timeout=timeout)

    def submit(self, script, args=(), *, env: dict | None = None, sbatch_options=(), cwd=None) -> int:
        """Submit ``script args...`` with sbatch from the head node; return the job id.

        ``env`` is the job's whole environment (sbatch exports it; default ``env()``).  Output goes to
        ``<workdir>/job-<id>.out``.
        """
        cmd = self.client([_which("sbatch"), "--parsable", f"--output={self.workdir}/job-%j.out", *sbatch_options,
                           os.fspath(script), *map(str, args)])
        out = subprocess.run(cmd, env=env if env is not None else self.env(), cwd=cwd, capture_output=True,
                             text=True, timeout=30)
        if out.returncode != 0:
            raise RuntimeError(f"sbatch failed ({out.returncode}): {out.stderr.strip()}\n{self.logs()}")
        return int(out.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict:
        """Return ``scontrol show job`` of the job as a dict of its fields (JobState, NodeList, ExitCode, ...)."""
        out = self.run_client([_which("scontrol"), "show", "job", "-o", str(job_id)])
        fields = dict(re.findall(r"(\w+)=(\S*)", out.stdout))
        if "JobState" not in fields:
            raise RuntimeError(f"scontrol show job {job_id}: {out.stderr.strip() or out.stdout.strip()}")
        return fields

    def job_state(self, job_id: int) -> str:
        return self.job_info(job_id)["JobState"]

    def wait(self, job_id: int, timeout: float) -> str:
        """Poll until the job finishes; return its final state, or 'TIMEOUT_WAITING' (job cancelled) on timeout."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job_id)
            if state in _FINISHED:
                return state
            self._check_daemons()
            time.sleep(0.5)
        self.run_client([_which("scancel"), str(job_id)])
        return "TIMEOUT_WAITING"

    def output(self, job_id: int) -> str:
        path = os.path.join(self.workdir, f"job-{job_id}.out")
        return open(path, encoding="utf-8", errors="replace").read() if os.path.exists(path) else ""

    def node_state(self, node: str) -> str:
        out = self.run_client([_which("scontrol"), "show", "node", "-o", node])
        m = re.search(r"\bState=(\S+)", out.stdout)
        if m is None:
            raise RuntimeError(f"scontrol show node {node}: {out.stderr.strip() or out.stdout.strip()}")
        return m.group(1)

    # -- the hosts ---------------------------------------------------------------------------------------------
    def run_on(self, host: int, argv: list, *, timeout: float = 60, env=None) -> subprocess.CompletedProcess:
        """Run ``argv`` on host ``host`` (stdout and stderr merged in ``stdout``); killed at ``timeout``."""
        return self.hosts.run(host, argv, timeout=timeout, env=env)

    def popen_on(self, host: int, argv: list, **kwargs) -> subprocess.Popen:
        """Start ``argv`` on host ``host`` in a session of its own; killed by close() if still running."""
        return self.hosts.popen(host, argv, **kwargs)

    def processes(self) -> dict:
        return self.hosts.processes()

    def daemon_pids(self) -> dict:
        return {name: proc.pid for name, proc in self._daemons if proc.poll() is None}

    def kill_host(self, host: int, *, command: str | None = None, sig: int = signal.SIGKILL) -> list:
        """Send ``sig`` (SIGKILL), at once, to the processes on host ``host``: a node dying under its job.

        Every process in the host's network namespace is signalled (the job's tasks, slurmstepd, a launcher's
        daemon such as Open MPI's prted) except the cluster's own daemons (that host's slurmd; on host 0 also
        slurmctld and munged), so SLURM goes on managing the node; with ``command``, only the processes whose
        command line contains it.  The pids are collected first and then signalled in one pass.  Return
        ``[(pid, command line)]`` of the processes signalled ([] when none matched).
        """
        keep = set(self.daemon_pids().values())
        victims = []
        for pid in self.processes().get(host, []):
            cmd = _cmdline(pid)
            daemon = os.path.basename(cmd.split(" ", 1)[0]) in ("slurmd", "slurmctld", "munged")
            if pid in keep or daemon or pid == os.getpid() or not cmd or (command is not None and command not in cmd):
                continue
            victims.append((pid, cmd))
        for pid, _ in victims:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        return victims

    def logs(self, lines: int = 30) -> str:
        """Return the last ``lines`` of each daemon's log and stderr (for failure messages)."""
        parts = []
        names = sorted(os.listdir(self.dir)) if os.path.isdir(self.dir) else []
        for name in (n for n in names if n.endswith((".log", ".stderr"))):
            with open(os.path.join(self.dir, name), errors="replace") as f:
                tail = f.readlines()[-lines:]
            if tail:
                parts.append(f"--- {name}\n" + "".join(tail))
        return "\n".join(parts)

    # -- internals ---------------------------------------------------------------------------------------------
    def _spawn(self, host: int, name: str, argv: list) -> subprocess.Popen:
        with open(os.path.join(self.dir, f"{name}.stderr"), "w") as log:
            # die with this process (SIGKILL by a timeout): the hosts' next remove_stale kills what they started
            proc = self.hosts.popen(host, argv, env=self.env(), stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        self._daemons.append((name, proc))
        return proc

    def _check_daemons(self) -> None:
        for name, proc in self._daemons:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with status {proc.returncode}\n{self.logs()}")

    def _queue(self) -> list:
        out = self.run_client([_which("squeue"), "-h", "-o", "%i %T"])
        return out.stdout.splitlines() if out.returncode == 0 else []

    def _start_munge(self, timeout: float) -> None:
        mdir = os.path.dirname(self.munge_socket)
        os.makedirs(mdir, mode=0o700)
        key = os.path.join(mdir, "munge.key")
        with open(os.open(key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
            f.write(os.urandom(1024))
        # One munged serves every host: a socket path is reachable from any network namespace.
        self._spawn(0, "munged", [_which("munged"), "--foreground", "--force", f"--socket={self.munge_socket}",
                                  f"--key-file={key}", f"--log-file={self.dir}/munged.log",
                                  f"--pid-file={mdir}/munged.pid", f"--seed-file={mdir}/munged.seed"])
        deadline = time.monotonic() + timeout
        while not os.path.exists(self.munge_socket):
            self._check_daemons()
            if time.monotonic() > deadline:
                raise RuntimeError(f"munged did not create its socket in {timeout:.0f} s\n{self.logs()}")
            time.sleep(0.1)

    def _write_config(self) -> None:
        d = self.dir
        os.makedirs(os.path.join(d, "state"))
        for host in self.hosts:
            os.makedirs(os.path.join(d, f"spool-{host.hostname}"))
        head = self.hosts[0]
        nodes = [f"NodeName={h.hostname} NodeAddr={h.address} CPUs={self.cpus} "
                 f"{f'Gres=gpu:{self.gpus} ' if self.gpus else ''}State=UNKNOWN" for h in self.hosts]
        lines = [
            "ClusterName=asyncsgdmulti",
            f"SlurmctldHost={head.hostname}({head.address})",
            "SlurmUser=root", "SlurmdUser=root",
            "AuthType=auth/munge", "CredType=cred/munge", f"AuthInfo=socket={self.munge_socket}",
            f"SlurmctldPort={_CTLD_PORT}", f"SlurmdPort={_SLURMD_PORT}",
            # %n: each slurmd (one per node, all sharing this file system) keeps its own spool, pid and log
            f"StateSaveLocation={d}/state", f"SlurmdSpoolDir={d}/spool-%n",
            f"SlurmctldPidFile={d}/slurmctld.pid", f"SlurmdPidFile={d}/slurmd-%n.pid",
            f"SlurmctldLogFile={d}/slurmctld.log", f"SlurmdLogFile={d}/slurmd-%n.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none",
            "SchedulerType=sched/builtin", "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core",
            "SlurmdParameters=config_overrides", "ReturnToService=2", "MpiDefault=none",
            "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none", f"PlugStackConfig={d}/plugstack.conf",
            "SlurmctldTimeout=30", "SlurmdTimeout=30", "MinJobAge=600", "KillWait=5",
            "GresTypes=gpu",
            *nodes,
            f"PartitionName=test Nodes={','.join(self.hostnames)} Default=YES MaxTime=INFINITE State=UP "
            "OverSubscribe=YES",
        ]
        # Job ids as in SlurmCluster: unique across clusters on one machine (MPI names shared memory after them).
        lines.insert(1, f"FirstJobId={(os.getpid() % 59_000 + 1) * 1000}")
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")
        write_fake_gpus(d, self.gpus)
        open(os.path.join(d, "plugstack.conf"), "w").close()

    def _wait_nodes_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        states: dict = {}
        problem = "no answer from sinfo"
        while time.monotonic() < deadline:
            self._check_daemons()
            out = self.run_client([_which("sinfo"), "-h", "-N", "-o", "%N %T"])
            states = dict(line.split()[:2] for line in out.stdout.splitlines() if len(line.split()) >= 2)
            problem = out.stderr.strip() or problem
            if len(states) == self.n_hosts and all(s.rstrip("*~#") in ("idle", "mixed", "allocated")
                                                   for s in states.values()):
                return
            if any("inval" in s or "drain" in s for s in states.values()):  # a configuration error
                break
            time.sleep(0.3)
        raise RuntimeError(f"nodes not ready in {timeout:.0f} s: {states or problem}\n{self.logs()}")


def leftovers(pid: int) -> list:
    """Return what the cluster of process ``pid`` left on the machine: namespaces, links, folders (its files
    included), mounts; [] when everything is gone."""
    tag = f"{PREFIX}{pid}"
    found = [f"netns {n}" for n in _sh("ip", "netns", "list", check=False).stdout.split() if n.startswith(tag)]
    links = _sh("ip", "-o", "link", "show", check=False).stdout
    found += [f"link {name}" for name in re.findall(r"^\d+: ([^:@\s]+)", links, flags=re.M) if name.startswith(tag)]
    for folder in (RUN_DIR, NETNS_ETC):
        if os.path.isdir(folder):
            found += [f"folder {folder}/{e}" for e in os.listdir(folder) if e.startswith(tag)]
    with open("/proc/self/mounts") as mounts:
        found += [f"mount {line.split()[1]}" for line in mounts if f"/{tag}" in line.split()[1]]
    return found


def process_identity(pid: int):
    """Return ``(pid, start time)`` of a live process, None when it is gone or a zombie: compare two of them to
    tell a process from a later one that got its pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] in ("Z", "X") else (pid, fields[19])


def _cmdline(pid: int) -> str:
    """Return process ``pid``'s command line, arguments joined by spaces ("" when it is gone)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def _cgroup_mounts() -> str:
    """Return shell commands that mount, again, the cgroup file systems mounted under /sys/fs/cgroup here.

    A cgroup v1 hierarchy or the v2 tree mounted a second time is the same one, so slurmd in a host sees the
    machine's cgroups.  Each command ends with ``&&``.
    """
    with open("/proc/self/mounts") as f:
        mounts = [line.split() for line in f]
    cmds = []
    for source, point, fstype, options, *_ in mounts:
        if point != "/sys/fs/cgroup" and not point.startswith("/sys/fs/cgroup/"):
            continue
        if fstype not in ("tmpfs", "cgroup", "cgroup2"):
            continue
        # keep the options that name what is mounted (controllers, name=...); rw/relatime and the like are defaults
        kept = [o for o in options.split(",") if o not in ("rw", "ro", "relatime", "noatime", "nosuid", "nodev",
                                                           "noexec", "seclabel")]
        opts = ["-o", ",".join(kept)] if kept else []
        cmds.append(f"mkdir -p {shlex.quote(point)} && mount -t {fstype} {shlex.join(opts)} "
                    f"{shlex.quote(source)} {shlex.quote(point)} &&")
    return " ".join(cmds)


def _main(argv: list) -> int:
    """``python slurm_multinode.py WORKDIR``: start a 3-node cluster, print its environment, wait for Enter."""
    with MultiNodeSlurm(argv[0]) as cluster:
        print(f"cluster up: {cluster.hostnames}; client commands: {shlex.join(cluster.client(['squeue']))} "
              f"with SLURM_CONF={cluster.conf}", flush=True)
        sys.stdin.readline()
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]) if len(sys.argv) == 2 else "usage: python slurm_multinode.py WORKDIR")
