"""A suite that passes at any job size; tests/harness/test_run_tests.py runs it through tests/run_tests.py.

Not collected by the main run (see tests/conftest.py).  At 2 ranks it gives: serial 1 passed; mpi 2 passed,
1 skipped (the ``ranks(3)`` test), plus the gpu test (passed with a GPU, skipped without).
"""
import pytest


def test_serial_arithmetic():
    assert sum(range(10)) == 45


@pytest.mark.mpi
def test_allreduce_sums_ranks():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD.Dup()
    try:
        total = comm.allreduce(comm.rank)
        assert total == comm.size * (comm.size - 1) // 2
    finally:
        comm.Free()


@pytest.mark.mpi(min_size=2)
def test_ring_exchange():
    from mpi4py import MPI
    comm = MPI.COMM_WORLD.Dup()
    try:
        right, left = (comm.rank + 1) % comm.size, (comm.rank - 1) % comm.size
        assert comm.sendrecv(comm.rank, dest=right, source=left) == left
    finally:
        comm.Free()


@pytest.mark.mpi
@pytest.mark.ranks(3)
def test_only_at_three_ranks():
    from mpi4py import MPI
    assert MPI.COMM_WORLD.size == 3


@pytest.mark.gpu
def test_gpu_visible():
    from asyncsgd.backends import gpu_count
    assert gpu_count() >= 1
