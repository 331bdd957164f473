"""A 3-rank job for tests/ulfm/test_stuck.py (``mpirun --with-ft ulfm -n 3``): rank 1's main thread sits in a call
that never returns, standing for an ``MPI_Accumulate`` spinning on the osc/sm lock of a rank killed inside one
(``asyncsgd.ulfm.stuck``).  First with every rank alive, for longer than the guard's limit (it must go on), then
after rank 2 SIGKILLed itself (the guard must end rank 1 with SIGKILL, naming rank 2).  Rank 0 reports which ranks it
sees dead and when, and ends the job (exit 0)."""
import os
import signal
import sys
import time

from mpi4py import MPI

from asyncsgd.ulfm.primitives import manage
from asyncsgd.ulfm.stuck import StuckCallGuard

LIMIT = 6.0


def stuck_call(seconds):
    # The guard watches this file's frames (files=...) as it watches the RMA modules' in a run.
    time.sleep(seconds)


def dead(comm):
    try:
        comm.Iprobe(MPI.ANY_SOURCE, MPI.ANY_TAG)
    except MPI.Exception:
        pass
    failed = comm.Get_failed()
    group = comm.Get_group()
    try:
        return sorted(MPI.Group.Translate_ranks(failed, list(range(failed.Get_size())), group))
    finally:
        failed.Free()
        group.Free()


def main():
    comm = manage(MPI.COMM_WORLD.Dup())
    if comm.rank == 1:
        StuckCallGuard(lambda: comm, lambda: list(range(comm.size)), limit=LIMIT,
                       files=(os.path.basename(__file__),))
        stuck_call(LIMIT + 4)  # everyone alive: a long call is no failure
        print("rank 1: the long call with every rank alive returned", flush=True)
    comm.Barrier()
    start = time.monotonic()
    if comm.rank == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    elif comm.rank == 1:
        stuck_call(120)
        print("rank 1: the stuck call returned (the guard did not end it)", flush=True)
    else:
        while time.monotonic() - start < 90 and dead(comm) != [1, 2]:
            time.sleep(0.2)
        print(f"rank 0: dead ranks {dead(comm)} after {time.monotonic() - start:.1f} s", flush=True)
        sys.stdout.flush()
        os._exit(0)  # no MPI_Finalize with dead ranks in COMM_WORLD


if __name__ == "__main__":
    main()
