"""MPI helpers shared by every role: waiting without spinning, failing as one job, errors from rank 0.

Facts that shaped this module (docs/MPI.md, measured on 2-core machines): a rank blocked in an MPICH call spins and
slows a computing neighbour 3-4x when ranks outnumber cores, so long waits poll a non-blocking operation with a short
sleep; and one rank failing before a collective hangs all others, so an exception on any rank aborts the whole job
(``abort_on_error``, ``install_abort_hook``; the policy is in docs/FAILURES.md).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
import time
import traceback

__all__ = ["UsageError", "wait", "polled_barrier", "polled_bcast", "install_abort_hook", "abort_on_error",
           "abort_job", "report_fatal", "check_on_root", "local_rank", "EXIT_USAGE"]

EXIT_USAGE = 2
_POLL_SLEEP = 0.001


class UsageError(ValueError):
    """Bad input found before work starts: printed as one line by rank 0, exit status 2."""


def wait(request, *, timeout: float | None = None, sleep: float = _POLL_SLEEP, what: str = "MPI request"):
    """Complete ``request`` by polling ``Test`` with a short sleep; return its status flag result.

    Raises TimeoutError after ``timeout`` seconds (None waits for ever, but never spins).
    """
    start = time.monotonic()
    while True:
        done = request.Test()
        if done:
            return done
        if timeout is not None and time.monotonic() - start > timeout:
            raise TimeoutError(f"{what} did not complete within {timeout:.0f} s")
        time.sleep(sleep)


def polled_barrier(comm, *, timeout: float | None = None, sleep: float = _POLL_SLEEP):
    """A barrier that sleeps while it waits (``Ibarrier`` + ``Test``), so waiting ranks leave the cores to others."""
    wait(comm.Ibarrier(), timeout=timeout, sleep=sleep, what="barrier")


def polled_bcast(comm, obj, root: int = 0, *, timeout: float | None = None, sleep: float = _POLL_SLEEP):
    """Broadcast a picklable object from ``root`` while sleeping between polls; return it on every rank.

    Two buffer broadcasts (length, then pickled bytes), each completed by polling: mpi4py's lowercase
    object broadcast has no non-blocking form.
    """
    import pickle

    import numpy
    from mpi4py import MPI

    data = pickle.dumps(obj) if comm.rank == root else b""
    length = numpy.array([len(data)], dtype=numpy.int64)
    wait(comm.Ibcast([length, MPI.INT64_T], root=root), timeout=timeout, sleep=sleep, what="broadcast")
    buf = numpy.frombuffer(bytearray(data), dtype=numpy.uint8) if comm.rank == root else \
        numpy.empty(int(length[0]), dtype=numpy.uint8)
    wait(comm.Ibcast([buf, MPI.BYTE], root=root), timeout=timeout, sleep=sleep, what="broadcast")
    return obj if comm.rank == root else pickle.loads(buf.tobytes())


def check_on_root(comm, check, *, root: int = 0):
    """Run ``check()`` on ``root`` only and share its verdict: ``root`` gets the return value, every rank
    raises the same UsageError if it failed.

    Use it for validation that reads files or costs time: one rank does it, and either all ranks go on or all raise
    the same UsageError (rank 0 prints it; see ``asyncsgd.train``).
    """
    result = error = None
    if comm.rank == root:
        try:
            result = check()
        except (UsageError, ValueError, OSError) as exc:
            error = str(exc)
    error = polled_bcast(comm, error, root=root)
    if error is not None:
        raise UsageError(error)
    return result


def local_rank(comm) -> int:
    """Return this rank's index among the ranks of its node (for binding GPUs)."""
    from mpi4py import MPI
    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    rank = node.rank
    node.Free()  # not in a `finally`: no collective on an error path (docs/FAILURES.md)
    return rank


# One report per process: the first failure (main thread or any other) prints; later ones only end the process.
_report_lock = threading.Lock()
_reported = False


def report_fatal(rank: int, exc_type, exc, tb, *, where: str = "") -> bool:
    """Print ``[asyncsgd rank R] fatal error...`` and the traceback to stderr, once per process.

    Return True when this call printed (False: another failure of this process already did).
    """
    global _reported
    with _report_lock:
        if _reported:
            return False
        _reported = True
    if issubclass(exc_type, KeyboardInterrupt):
        # Ctrl-C reaches every rank at once: one line each, not a traceback each
        sys.stderr.write(f"[asyncsgd rank {rank}] interrupted, aborting the job\n")
        sys.stderr.flush()
        return True
    msg = "".join(traceback.format_exception(exc_type, exc, tb))
    sys.stderr.write(f"[asyncsgd rank {rank}] fatal error{where}, aborting the job:\n{msg}")
    sys.stderr.flush()
    return True


_abort_lock = threading.Lock()
# A rank whose MPI_Abort has not ended it after this long ends itself: an abort must never become a hang.
_ABORT_GRACE_S = 10.0


def abort_job(comm, code: int = 1):
    """End every rank of ``comm``'s job now (``MPI_Abort``); in a one-rank or serial run end this process.

    Never returns.  Called from any thread; nothing is freed, no collective runs.  Only the first thread of a rank to
    get here calls ``MPI_Abort`` (a watchdog thread and the main thread can both see the same dead rank at once, and
    two concurrent aborts in one process are not something MPI promises to survive); a later caller waits for it.
    Either way the process exits by itself if the abort has not ended it within ``_ABORT_GRACE_S`` seconds.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    if comm is not None and comm.size > 1:
        if not _abort_lock.acquire(blocking=False):
            time.sleep(_ABORT_GRACE_S)  # the first caller is aborting this process
            os._exit(code)
        fallback = threading.Timer(_ABORT_GRACE_S, os._exit, (code,))
        fallback.daemon = True
        fallback.start()
        # mpi4py keeps the GIL inside MPI_Abort, so a Python timer cannot run while an abort hangs (seen under
        # MPICH over TCP with a dead host: stuck in libfabric's connect()); the kernel's SIGALRM, left at its
        # default action, ends the process without the interpreter.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGALRM, signal.SIG_DFL)
        signal.alarm(int(_ABORT_GRACE_S) + 2)
        comm.Abort(code)
    os._exit(code)


def _rank_of(comm) -> int:
    return 0 if comm is None else comm.rank


@contextlib.contextmanager
def abort_on_error(comm):
    """Run the block so that an exception escaping it on any rank ends the whole job, with its traceback.

    The exit policy of the package (docs/FAILURES.md): the failing rank prints ``[asyncsgd rank R] ...traceback...``
    once and calls ``comm.Abort(1)``; the other ranks may be anywhere (computing, in a collective, polling a
    window), so nothing collective can run on the way out.  Window owners leave their ``with`` block without
    freeing on an exception (``asyncsgd.rma.owner.WindowOwner``) so the exception reaches this point at once.
    With ``comm`` None or of one rank (serial runs) it prints the same and raises ``SystemExit(1)``.
    Exceptions in other threads end the job too while the block runs (``threading.excepthook``).
    """
    previous = threading.excepthook
    threading.excepthook = _thread_hook(comm)
    try:
        yield
    except SystemExit as exc:
        if comm is not None and comm.size > 1 and exc.code not in (None, 0):
            # one rank leaving alone would leave the rest waiting for it
            report_fatal(comm.rank, type(exc), exc, None, where=f" (exit status {exc.code})")
            abort_job(comm, exc.code if isinstance(exc.code, int) else 1)
        raise
    except BaseException as exc:
        report_fatal(_rank_of(comm), type(exc), exc, exc.__traceback__)
        if comm is not None and comm.size > 1:
            abort_job(comm, 1)
        raise SystemExit(1) from None
    finally:
        threading.excepthook = previous


def _thread_hook(comm):
    def hook(args):
        if args.exc_type is SystemExit:
            return
        name = args.thread.name if args.thread is not None else "?"
        report_fatal(_rank_of(comm), args.exc_type, args.exc_value, args.exc_traceback, where=f" in thread {name}")
        abort_job(comm, 1)  # a dead helper thread (progress, heartbeats) would otherwise leave the job hanging
    return hook


def install_abort_hook(comm):
    """Make an uncaught exception on any rank, in any thread, print its traceback, rank-tagged, and abort the job.

    Without it one failing rank leaves the others blocked in their next collective or RMA epoch for ever.
    ``abort_on_error`` does the same for a block; this hook covers what runs outside one.
    """
    def hook(exc_type, exc, tb):
        report_fatal(_rank_of(comm), exc_type, exc, tb)
        abort_job(comm, 1)

    sys.excepthook = hook
    threading.excepthook = _thread_hook(comm)
    return hook
