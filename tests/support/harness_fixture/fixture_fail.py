"""Planted failures for tests/harness/test_run_tests.py: each would hang a naive multi-rank run.

Not collected by the main run (see tests/conftest.py); select one test with -k.
"""
import time

import pytest


@pytest.mark.mpi
def test_passes_first():
    # the ranks leave together, so rank 0 has surely counted this pass before rank 1's planted failure next
    from mpi4py import MPI
    MPI.COMM_WORLD.Barrier()


@pytest.mark.mpi(min_size=2)
def test_rank1_raises_before_barrier():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD.Dup()
    if comm.rank == 1:
        raise RuntimeError("planted failure on rank 1")
    comm.Barrier()          # the other ranks wait here for rank 1, which never comes


@pytest.mark.mpi(min_size=2)
def test_rank0_waits_in_barrier_alone():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD.Dup()
    if comm.rank == 0:
        comm.Barrier()      # nobody else enters: only the per-test timeout can end this


def test_serial_sleeps_past_its_timeout():
    time.sleep(600)         # the run's per-test timeout fails this test; the next one still runs


def test_serial_runs_after_a_timeout():
    assert True
