"""``--kill-ranks R:SECONDS``: a rank SIGKILLs itself after SECONDS of training (a test tool, like ``--slow-ranks``;
``ASYNCSGD_FAULT``'s ``=kill`` in ``asyncsgd.runtime.faults`` kills at a named point instead).

These test deaths land between two Python bytecodes of the main thread, never inside an MPI call: the timer (or
the rank that kills another, ``=kill:VICTIM``) sends ``DIE_SIGNAL``, whose Python-level handler (run by the
interpreter in the main thread between bytecodes) SIGKILLs the process.  Why: under Open MPI's ``osc/sm`` a rank
killed inside an ``MPI_Accumulate`` leaves the target's accumulate lock taken, and every later accumulate to that
target spins for ever (docs/FAULT_TOLERANCE.md, "Limits"); a test death at a random instant made the run-through
tests hang now and then.  A death from outside (``kill -9``) still lands anywhere.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

from mpi4py import MPI

__all__ = ["arm_self_kill", "die_on_signal", "DIE_SIGNAL"]

DIE_SIGNAL = signal.SIGUSR2  # SIGTERM and SIGUSR1 are the launchers' (asyncsgd.runtime.watchdog)
_FALLBACK_S = 2.0  # a --kill-ranks death the main thread has not taken by then is a plain SIGKILL


def _die(signum, frame):
    os.kill(os.getpid(), signal.SIGKILL)


def die_on_signal():
    """Make ``DIE_SIGNAL`` SIGKILL this process at the main thread's next Python bytecode (call from the main
    thread; a test tool: only runs that inject deaths install it)."""
    signal.signal(DIE_SIGNAL, _die)


def arm_self_kill(seconds, elapsed):
    """SIGKILL this process when ``elapsed()`` (seconds of training) reaches ``seconds``, between two Python bytecodes
    of the main thread (see the module docstring); None does nothing.  Says so on stdout first, so tests and users
    see which rank went and when.  Call from the main thread."""
    if seconds is None:
        return
    die_on_signal()

    def die():
        sys.stdout.write(f"asyncsgd: --kill-ranks: rank {MPI.COMM_WORLD.rank} (pid {os.getpid()}) kills itself "
                         f"at {elapsed():.1f} s\n")
        sys.stdout.flush()
        time.sleep(0.05)  # let the launcher forward the line
        os.kill(os.getpid(), DIE_SIGNAL)
        # The handler waits for the main thread's next bytecode; a main thread blocked in one long C call (a
        # blocking collective) would delay the death without bound, so SIGKILL from here after a while.
        time.sleep(_FALLBACK_S)
        os.kill(os.getpid(), signal.SIGKILL)

    timer = threading.Timer(max(0.0, seconds - elapsed()), die)
    timer.daemon = True
    timer.start()
