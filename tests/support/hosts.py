"""Several hosts on one machine, for tests and benchmarks: network namespaces on a bridge, each a host of its own.

Each host is a Linux network namespace with one address on a private bridge (10.213.X.0/24, on this fixture's own
bridge only; the machine's own namespace gets no address on it, so traffic can only flow between the fixture's
hosts) and its own hostname (a persistent UTS namespace), so MPI treats the hosts as separate nodes and talks TCP
between them, while ranks on one host still use shared memory.  Each host's link can be limited in bandwidth
(``tc tbf`` on both ends of its veth pair: what the host sends and what it receives) and, where the kernel has
``sch_netem``, delayed (added to what the host sends).

MPI jobs start inside the first rank's host; the other hosts are reached through a small "ssh" script that enters
a host's namespaces instead of logging in: MPICH's hydra takes it as ``-launcher ssh -launcher-exec SCRIPT``, Open
MPI as ``--mca plm_rsh_agent SCRIPT``.  Each host's ``/etc/hosts`` (``ip netns exec`` mounts
``/etc/netns/NAME/hosts`` over it) resolves every host name to its address.

Everything made is named after this process (``asgd<pid>...``) and removed by ``close()`` (also from ``__exit__``
and at interpreter exit): processes left in a host (a job killed half way), the namespaces, links, the bridge and
the files.  Objects of processes that no longer exist (a run killed by SIGKILL) are removed the next time hosts are
made.  Needs root and iproute2 (``ip``, ``tc``) plus util-linux (``unshare``, ``nsenter``): see ``unavailable()``.

    with Hosts(3, rate="1gbit") as hosts:
        out = hosts.run_mpi([0, 1, 2, 0], [sys.executable, "script.py"], timeout=120)
"""
from __future__ import annotations

import atexit
import contextlib
import functools
import ipaddress
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

from paths import REPO as ROOT  # this folder: on sys.path from conftest, or as the script's own folder

if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


__all__ = ["Host", "Hosts", "unavailable", "netem_available", "remove_stale", "mpi_flavour_of", "mpi_pythons",
           "probe_transfer", "PREFIX"]

PREFIX = "asgd"                     # every object's name starts with PREFIX + this process's pid
DEVICE = "eth0"                     # the host's interface, inside its namespace (names are per namespace)
RUN_DIR = "/run"                    # per-process folder for the launch script and the UTS namespace files
NETNS_ETC = "/etc/netns"            # `ip netns exec NAME` mounts /etc/netns/NAME/* over /etc/*
_PROGRAMS = ("ip", "tc", "unshare", "nsenter", "mount", "umount")
_NAME = re.compile(rf"^{PREFIX}(\d+)")
_CMD_TIMEOUT = 30                   # s for one ip/tc/mount command
_active = threading.Lock()          # one set of hosts per process: the names are the pid's


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))


def unavailable() -> str | None:
    """Return None when hosts can be made here, else why not (a skip reason)."""
    if sys.platform != "linux":
        return "network namespaces need Linux"
    if os.geteuid() != 0:
        return "making network namespaces needs root"
    missing = [p for p in _PROGRAMS if _which(p) is None]
    if missing:
        return f"missing {', '.join(missing)} (apt-get install iproute2 util-linux mount)"
    probe = subprocess.run([_which("ip"), "netns", "list"], capture_output=True, text=True, timeout=_CMD_TIMEOUT)
    if probe.returncode != 0:
        return f"`ip netns list` failed: {probe.stderr.strip()}"
    return None


def netem_available() -> bool:
    """Return whether this kernel has the netem qdisc (needed for an added link delay)."""
    name = f"{PREFIX}{os.getpid()}nt"
    if subprocess.run([_which("ip"), "link", "add", name, "type", "dummy"], capture_output=True,
                      timeout=_CMD_TIMEOUT).returncode != 0:
        return False
    try:
        return subprocess.run([_which("tc"), "qdisc", "add", "dev", name, "root", "netem", "delay", "1ms"],
                              capture_output=True, timeout=_CMD_TIMEOUT).returncode == 0
    finally:
        subprocess.run([_which("ip"), "link", "del", name], capture_output=True, timeout=_CMD_TIMEOUT)


def _sh(*argv, check: bool = True) -> subprocess.CompletedProcess:
    """Run one ip/tc/mount command (bounded in time); raise RuntimeError with its message when it fails."""
    out = subprocess.run([_which(argv[0]) or argv[0], *argv[1:]], capture_output=True, text=True,
                         timeout=_CMD_TIMEOUT)
    if check and out.returncode != 0:
        raise RuntimeError(f"`{shlex.join(argv)}` failed: {(out.stderr or out.stdout).strip()}")
    return out


def _pid_alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")


def _ours(name: str, pid: int | None) -> bool:
    """Whether ``name`` was made by process ``pid`` (None: by any process that no longer exists)."""
    match = _NAME.match(name)
    if match is None:
        return False
    owner = int(match.group(1))
    return owner == pid if pid is not None else not _pid_alive(owner)


def remove_stale(pid: int | None = None) -> list:
    """Remove hosts left by process ``pid`` (None: by every process that no longer exists); return what went.

    Kills the processes still inside those namespaces first, so nothing keeps running on a removed host.
    """
    removed = []
    netns = [line.split()[0] for line in _sh("ip", "netns", "list", check=False).stdout.splitlines() if line.strip()]
    for ns in (n for n in netns if _ours(n, pid)):
        _kill_in_netns(ns)
        _sh("ip", "netns", "del", ns, check=False)
        removed.append(f"netns {ns}")
    links = _sh("ip", "-o", "link", "show", check=False).stdout
    for name in re.findall(r"^\d+: ([^:@\s]+)", links, flags=re.M):
        if _ours(name, pid):
            _sh("ip", "link", "del", name, check=False)
            removed.append(f"link {name}")
    for folder in (NETNS_ETC, RUN_DIR):
        with contextlib.suppress(FileNotFoundError):
            for entry in os.listdir(folder):
                if _ours(entry, pid):
                    path = os.path.join(folder, entry)
                    if folder == RUN_DIR:
                        _unmount_all(path)
                    shutil.rmtree(path, ignore_errors=True)
                    removed.append(f"folder {path}")
    return removed


def _unmount_all(folder: str):
    """Unmount the UTS namespace files bind-mounted in ``folder``."""
    with open("/proc/self/mounts") as mounts:
        points = [line.split()[1] for line in mounts if line.split()[1].startswith(folder + "/")]
    for point in points:
        _sh("umount", "-l", point, check=False)


def _netns_pids(ns: str) -> list:
    out = _sh("ip", "netns", "pids", ns, check=False).stdout
    return [int(p) for p in out.split() if p.isdigit()]


def _kill_in_netns(ns: str, *, wait_s: float = 5.0):
    """SIGKILL every process in network namespace ``ns`` and wait (bounded) until they are gone."""
    deadline = time.monotonic() + wait_s
    for _ in range(50):
        pids = _netns_pids(ns)
        if not pids or time.monotonic() > deadline:
            return
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.05)


@dataclass(frozen=True)
class Host:
    """One host: its hostname, network namespace, address, its veth on the bridge and its UTS namespace file."""
    index: int
    hostname: str
    netns: str
    address: str
    link: str
    uts: str

    def enter(self) -> list:
        """Return the command prefix that runs a program on this host (its network, hostname and /etc/hosts)."""
        return [_which("nsenter"), f"--uts={self.uts}", "--", _which("ip"), "netns", "exec", self.netns]


class Hosts:
    """``n`` hosts on a private bridge; a context manager that removes everything it made when it is left.

    ``rate``: each host link's bandwidth in tc's units ("1gbit", "100mbit"; None: unlimited), both directions.
    ``delay``: one-way delay added to what each host sends ("100us"; None: none); needs the kernel's netem
    (``netem_available()``), else ValueError.
    """

    def __init__(self, n: int, *, rate: str | None = None, delay: str | None = None):
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 200:
            raise ValueError(f"n must be an integer from 1 to 200 hosts, got {n!r}")
        self.n = n
        self.rate = rate
        self.delay = delay
        self.tag = f"{PREFIX}{os.getpid()}"
        self.subnet = ipaddress.ip_network(f"10.213.{os.getpid() % 250 + 1}.0/24")
        self.bridge = f"{self.tag}br"
        self.run_dir = os.path.join(RUN_DIR, self.tag)
        self.launcher = os.path.join(self.run_dir, "enter-host")
        self.hosts: list = []
        self._procs: list = []
        self._open = False

    # ---------------------------------------------------------------- lifetime

    def __enter__(self) -> "Hosts":
        self.start()
        return self

    def __exit__(self, exc_type, exc, tb):
        self.close()
        return False

    def start(self) -> "Hosts":
        """Make the bridge and the hosts; on any failure remove what was made and raise."""
        why = unavailable()
        if why is not None:
            raise RuntimeError(f"cannot make hosts: {why}")
        if self.delay is not None and not netem_available():
            raise ValueError(f"delay={self.delay!r} needs the netem qdisc, which this kernel lacks: "
                             "use delay=None")
        if not _active.acquire(blocking=False):
            raise RuntimeError("another Hosts is open in this process: close it first (names are per process)")
        self._open = True
        atexit.register(self.close)
        try:
            remove_stale(None)
            remove_stale(os.getpid())
            os.makedirs(self.run_dir)
            _sh("ip", "link", "add", self.bridge, "type", "bridge")
            _sh("ip", "link", "set", self.bridge, "up")
            addresses = list(self.subnet.hosts())
            for i in range(self.n):
                self.hosts.append(self._make_host(i, str(addresses[i])))
            for host in self.hosts:
                self._write_etc_hosts(host)
            self.set_links(rate=self.rate, delay=self.delay)
            self._write_launcher()
        except BaseException:
            self.close()
            raise
        return self

    def close(self):
        """Kill the jobs started here and every process left in a host, then remove everything; idempotent."""
        if not self._open:
            return
        try:
            for proc in self._procs:
                _kill_group(proc)
            self._procs = []
            remove_stale(os.getpid())
            self.hosts = []
        finally:
            self._open = False
            atexit.unregister(self.close)
            _active.release()

    # ---------------------------------------------------------------- building

    def _make_host(self, i: int, address: str) -> Host:
        ns = f"{self.tag}-h{i}"
        link = f"{self.tag}h{i}"
        uts = os.path.join(self.run_dir, f"uts{i}")
        hostname = f"host{i}"
        _sh("ip", "netns", "add", ns)
        _sh("ip", "link", "add", link, "type", "veth", "peer", "name", DEVICE, "netns", ns)
        _sh("ip", "link", "set", link, "master", self.bridge, "up")
        _sh("ip", "-n", ns, "addr", "add", f"{address}/{self.subnet.prefixlen}", "dev", DEVICE)
        _sh("ip", "-n", ns, "link", "set", DEVICE, "up")
        _sh("ip", "-n", ns, "link", "set", "lo", "up")
        open(uts, "w").close()
        _sh("unshare", f"--uts={uts}", "hostname", hostname)
        return Host(i, hostname, ns, address, link, uts)

    def _write_etc_hosts(self, host: Host):
        folder = os.path.join(NETNS_ETC, host.netns)
        os.makedirs(folder, exist_ok=True)
        lines = ["127.0.0.1\tlocalhost", "::1\tlocalhost ip6-localhost ip6-loopback"]
        lines += [f"{h.address}\t{h.hostname}" for h in self.hosts]
        with open(os.path.join(folder, "hosts"), "w") as f:
            f.write("\n".join(lines) + "\n")

    def set_links(self, *, rate: str | None = None, delay: str | None = None):
        """Set every host link's bandwidth (both directions) and added one-way delay; None removes a limit."""
        burst = _burst(rate) if rate is not None else None          # validates before anything changes
        self.rate, self.delay = rate, delay
        for host in self.hosts:
            for ns, dev, outgoing in ((host.netns, DEVICE, True), (None, host.link, False)):
                where = ["-n", ns] if ns else []
                _sh("tc", *where, "qdisc", "del", "dev", dev, "root", check=False)
                parent = ["root"]
                if outgoing and delay is not None:
                    _sh("tc", *where, "qdisc", "add", "dev", dev, "root", "handle", "1:", "netem", "delay", delay,
                        "limit", "100000")
                    parent = ["parent", "1:1"]
                if rate is not None:
                    _sh("tc", *where, "qdisc", "add", "dev", dev, *parent, "handle", "10:", "tbf", "rate", rate,
                        "burst", burst, "latency", "50ms")

    def _write_launcher(self):
        """Write the 'ssh' of these hosts: ``enter-host [options] HOST COMMAND...`` runs COMMAND on HOST.

        Like ssh it joins COMMAND's words and runs them with ``sh -c`` (launchers quote for a remote shell); it
        accepts a host's name or address and skips ssh options such as hydra's ``-x``.
        """
        cases = []
        for h in self.hosts:
            prefix = shlex.join(h.enter())
            cases.append(f"    {h.hostname}|{h.address}) exec {prefix} sh -c \"$*\" ;;")
        script = "\n".join([
            "#!/bin/sh",
            f"# Enter one of the hosts made by process {os.getpid()} (tests/support/hosts.py) and run a command there.",
            "while [ $# -gt 0 ]; do",
            "    case \"$1\" in -o|-p|-l|-i|-F|-E) shift 2 ;; -*) shift ;; *) break ;; esac",
            "done",
            "host=$1; shift",
            "case \"$host\" in",
            *cases,
            "    *) echo \"enter-host: no host '$host' here\" >&2; exit 255 ;;",
            "esac",
            ""])
        with open(self.launcher, "w") as f:
            f.write(script)
        os.chmod(self.launcher, 0o755)

    # ---------------------------------------------------------------- running things on hosts

    def __getitem__(self, i: int) -> Host:
        return self.hosts[i]

    def __len__(self) -> int:
        return len(self.hosts)

    def run(self, host: int, argv: list, *, timeout: float = 60, env=None) -> subprocess.CompletedProcess:
        """Run ``argv`` on host ``host``; return the CompletedProcess (text, stderr merged); killed at timeout."""
        proc = self.popen(host, argv, env=env)
        return _communicate(proc, timeout, argv)

    def popen(self, host: int, argv: list, *, env=None, **kwargs) -> subprocess.Popen:
        """Start ``argv`` on host ``host`` in a session of its own (killed by ``close()``); stdout+stderr piped."""
        self._need_open()
        kwargs.setdefault("stdout", subprocess.PIPE)
        kwargs.setdefault("stderr", subprocess.STDOUT)
        proc = subprocess.Popen(self.hosts[host].enter() + list(argv), text=True, env=env,
                                start_new_session=True, **kwargs)
        self._procs.append(proc)
        return proc

    def mpi_command(self, placement, argv: list, *, timeout: float = 120, env=None, python=None) -> tuple:
        """Return ``(argv, env)`` of an mpiexec running ``argv`` with rank r on host ``placement[r]``.

        The command runs on host ``placement[0]`` (start it with ``popen``/``run``).  The MPI is the one that
        mpi4py loads in ``python`` (default: this interpreter), started with the mpiexec beside it; ``argv`` may
        name ``"{python}"`` for that interpreter.  The job ends itself after ``timeout`` seconds.

        Between hosts MPI must use TCP on the hosts' interface, never shared memory (all hosts share one kernel,
        and UCX, MPICH's default netmod in the PyPI build, finds and uses shared memory across namespaces): MPICH
        gets libfabric's tcp provider, Open MPI its ob1 messaging over the tcp and sm transports.  Open MPI jobs
        also get ``ASYNCSGD_STORE=messages`` (unless ``env`` names one): its RMA over TCP is emulated in software,
        so the parameter store is served by threads over messages instead (docs/NETWORK.md).
        """
        placement = self._placement(placement)
        python = python or sys.executable
        flavour = mpi_flavour_of(python)
        env = _mpi_env(flavour, env)
        mpiexec = os.path.join(os.path.dirname(python), "mpiexec")
        argv = [python if a == "{python}" else a for a in argv]
        job_timeout = str(max(5, int(timeout)))
        if flavour == "openmpi":
            env.setdefault("OMPI_MCA_pml", "ob1")
            env.setdefault("OMPI_MCA_btl", "self,sm,tcp")
            # Open MPI's one-sided operations over TCP are software-emulated (an Accumulate is lock + get + add +
            # put + unlock across the network): the parameter store uses messages served by a thread instead.
            env.setdefault("ASYNCSGD_STORE", "messages")
            cmd = [mpiexec, "--timeout", job_timeout,
                   "--mca", "plm_rsh_agent", self.launcher,
                   "--mca", "btl_tcp_if_include", DEVICE, "--mca", "oob_tcp_if_include", DEVICE]
            # One MPMD segment per run of consecutive ranks on one host keeps any placement in rank order.
            segments = []
            for host in placement:
                if segments and segments[-1][0] == host:
                    segments[-1][1] += 1
                else:
                    segments.append([host, 1])
            for k, (host, count) in enumerate(segments):
                cmd += ([":"] if k else []) + ["--host", f"{self.hosts[host].hostname}:{count}", "-np", str(count)]
                cmd += list(argv)
        else:
            env["MPIEXEC_TIMEOUT"] = job_timeout
            env.setdefault("MPIR_CVAR_CH4_NETMOD", "ofi")
            env.setdefault("FI_PROVIDER", "tcp")
            env.setdefault("FI_TCP_IFACE", DEVICE)
            used = sorted(set(placement))
            node = {host: k for k, host in enumerate(used)}
            cmd = [mpiexec, "-launcher", "ssh", "-launcher-exec", self.launcher, "-iface", DEVICE,
                   "-hosts", ",".join(self.hosts[h].hostname for h in used),
                   "-rankmap", "(vector," + ",".join(str(node[h]) for h in placement) + ")",
                   "-n", str(len(placement)), *argv]
        return cmd, env

    def popen_mpi(self, placement, argv: list, *, timeout: float = 120, env=None, python=None) \
            -> subprocess.Popen:
        """Start an MPI job (see ``mpi_command``); the caller waits; ``close()`` kills it if still running."""
        cmd, env = self.mpi_command(placement, argv, timeout=timeout, env=env, python=python)
        return self.popen(self._placement(placement)[0], cmd, env=env)

    def run_mpi(self, placement, argv: list, *, timeout: float = 120, env=None, python=None) \
            -> subprocess.CompletedProcess:
        """Run an MPI job to its end; killed (subprocess.TimeoutExpired) ``timeout`` + 10 s after it started."""
        proc = self.popen_mpi(placement, argv, timeout=timeout, env=env, python=python)
        return _communicate(proc, timeout + 10, argv)

    def processes(self) -> dict:
        """Return ``{host index: [pids of processes in its network namespace]}``."""
        return {h.index: _netns_pids(h.netns) for h in self.hosts}

    # ---------------------------------------------------------------- checks

    def _need_open(self):
        if not self._open or not self.hosts:
            raise RuntimeError("Hosts is not open: use it as a context manager or call start()")

    def _placement(self, placement) -> list:
        placement = list(placement)
        if not placement:
            raise ValueError("placement must name a host for at least one rank")
        for host in placement:
            if isinstance(host, bool) or not isinstance(host, int) or not 0 <= host < len(self.hosts):
                raise ValueError(f"placement holds {host!r}: use host indices 0..{len(self.hosts) - 1}")
        return placement


@functools.lru_cache(maxsize=None)
def mpi_flavour_of(python: str) -> str:
    """Return 'openmpi' or 'mpich' for the MPI that mpi4py loads in interpreter ``python``."""
    out = subprocess.run([python, "-c", "from mpi4py import MPI; print(MPI.Get_library_version())"],
                         capture_output=True, text=True, timeout=60,
                         env={**os.environ, "OMPI_ALLOW_RUN_AS_ROOT": "1", "OMPI_ALLOW_RUN_AS_ROOT_CONFIRM": "1"})
    if out.returncode != 0:
        raise RuntimeError(f"{python} cannot import mpi4py: {out.stderr.strip()[-300:]}")
    return "openmpi" if "open mpi" in out.stdout.lower() else "mpich"


def mpi_pythons() -> dict:
    """Return ``{flavour: python}`` for this interpreter and the repository's other virtualenv, where it exists.

    The README's two virtualenvs: ``.venv`` (MPICH) and ``.venv-openmpi``; either may be the running one.
    """
    found = {mpi_flavour_of(sys.executable): sys.executable}
    for venv in (".venv", ".venv-openmpi"):
        python = os.path.join(ROOT, venv, "bin", "python")
        if os.path.exists(python) and os.path.exists(os.path.join(ROOT, venv, "bin", "mpiexec")):
            with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
                found.setdefault(mpi_flavour_of(python), python)
    return found


def _mpi_env(flavour: str, base=None) -> dict:
    """Return an environment for ``flavour``'s mpiexec (root and oversubscription allowed, as asyncsgd.testing.launch)."""
    env = dict(os.environ if base is None else base)
    if flavour == "openmpi":
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT", "1")
        env.setdefault("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1")
        env.setdefault("PRTE_MCA_rmaps_default_mapping_policy", ":oversubscribe")
        env.setdefault("OMPI_MCA_osc", "^ucx")
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def _burst(rate: str) -> str:
    """Return a tbf bucket of ~2 ms of traffic at ``rate`` (at least 256 KiB: veth hands over 64 KiB segments)."""
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kmg]?)(bit|bps)", rate.lower())
    if match is None:
        raise ValueError(f"rate must look like '1gbit' or '100mbit', got {rate!r}")
    value = float(match.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "g": 1e9}[match.group(2)]
    bytes_per_s = value / 8 if match.group(3) == "bit" else value
    return str(max(256 * 1024, int(bytes_per_s * 0.002)))


def _kill_group(proc: subprocess.Popen) -> str:
    """SIGKILL ``proc``'s process group (the job and what it started on its own host); return its last output."""
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired, ValueError):
        out, _ = proc.communicate(timeout=10)
        return out or ""
    return ""


def _communicate(proc: subprocess.Popen, timeout: float, argv) -> subprocess.CompletedProcess:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        raise subprocess.TimeoutExpired(argv, timeout, output=_kill_group(proc)) from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, None)


# ------------------------------------------------------------------ a transfer probe (rank program and driver)

def probe_transfer(hosts: Hosts, placement, nbytes: int = 4 << 20, *, python=None, timeout: float = 60) -> dict:
    """Time a ``nbytes`` message from rank 0 to every other rank (best of 2, with a 1-byte reply).

    Returns ``{"hosts": [hostname of each rank], "seconds": {rank: s}}``; raises RuntimeError when the job fails.
    """
    out = hosts.run_mpi(placement, ["{python}", os.path.abspath(__file__), "probe", str(int(nbytes))],
                        timeout=timeout, python=python)
    for line in out.stdout.splitlines():
        if line.startswith("PROBE "):
            found = json.loads(line[len("PROBE "):])
            found["seconds"] = {int(k): v for k, v in found["seconds"].items()}
            return found
    raise RuntimeError(f"probe job failed (exit {out.returncode}):\n{out.stdout[-2000:]}")


def _probe_main(nbytes: int):
    """Rank program of ``probe_transfer``: print one ``PROBE {json}`` line on rank 0."""
    import socket

    import numpy
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    data = numpy.ones(nbytes, numpy.uint8)
    ack = numpy.zeros(1, numpy.uint8)
    best = {}
    for peer in range(1, comm.size):
        for _ in range(2):
            comm.Barrier()
            if comm.rank == 0:
                start = time.perf_counter()
                comm.Send(data, dest=peer)
                comm.Recv(ack, source=peer)
                best[peer] = min(best.get(peer, float("inf")), time.perf_counter() - start)
            elif comm.rank == peer:
                comm.Recv(data, source=0)
                comm.Send(ack, dest=0)
    names = comm.gather(socket.gethostname())
    if comm.rank == 0:
        print("PROBE " + json.dumps({"hosts": names, "seconds": best}), flush=True)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "probe":
        _probe_main(int(sys.argv[2]))
    else:
        sys.exit("usage: python tests/support/hosts.py probe NBYTES   (a rank program started by probe_transfer)")
