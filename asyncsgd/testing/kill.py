"""``--kill-ranks R:SECONDS``: a rank SIGKILLs itself after SECONDS of training (a test tool, like ``--slow-ranks``;
``ASYNCSGD_FAULT``'s ``=kill`` in ``asyncsgd.runtime.faults`` kills at a named point instead)."""
from __future__ import annotations

import os
import signal
import sys
import threading
import time

from mpi4py import MPI

__all__ = ["arm_self_kill"]


def arm_self_kill(seconds, elapsed):
    """SIGKILL this process when ``elapsed()`` (seconds of training) reaches ``seconds``; None does nothing.  Says
    so on stdout first, so tests and users see which rank went and when."""
    if seconds is None:
        return

    def die():
        sys.stdout.write(f"asyncsgd: --kill-ranks: rank {MPI.COMM_WORLD.rank} (pid {os.getpid()}) kills itself "
                         f"at {elapsed():.1f} s\n")
        sys.stdout.flush()
        time.sleep(0.05)  # let the launcher forward the line
        os.kill(os.getpid(), signal.SIGKILL)

    timer = threading.Timer(max(0.0, seconds - elapsed()), die)
    timer.daemon = True
    timer.start()
