"""asyncsgd.rma.board: the job board gives rank 0 every worker's row and the flags, with accumulates (default) or,
under fault tolerance (``lockless``), with puts, gets and rank 0's own memory, which no dead rank can leave locked."""
from __future__ import annotations

import numpy as np
import pytest

from asyncsgd.rma.board import FLAG_STOP, FLAG_WARM_DONE, HIST_BINS, JobBoard
from asyncsgd.runtime.mpi import polled_barrier
from mpi_checks import agree

pytestmark = pytest.mark.timeout(120, method="thread")


@pytest.mark.mpi(min_size=2)
@pytest.mark.ranks(2, 3)
@pytest.mark.parametrize("lockless", [False, True], ids=["accumulate", "lockless"])
def test_rows_and_flags_reach_every_rank(comm, lockless):
    n_workers = comm.size - 1
    failures = []
    with JobBoard(comm, n_workers, lockless=lockless) as board:
        if comm.rank >= 1:
            worker = comm.rank - 1
            board.publish(worker, {"steps": 10 + worker, "samples": 100.0 * (worker + 1), "done": 1.0},
                          np.arange(HIST_BINS) + worker)
        if comm.rank == 0:
            board.set_flag(FLAG_STOP)
        polled_barrier(comm)
        if board.flag(FLAG_STOP) != 1.0 or board.flag(FLAG_WARM_DONE) != 0.0:
            failures.append(f"flags {board.flag(FLAG_STOP)}, {board.flag(FLAG_WARM_DONE)}")
        if comm.rank == 0:
            stats, hist = board.rows()
            for w, s in enumerate(stats):
                if (s["steps"], s["samples"], s["done"]) != (10 + w, 100.0 * (w + 1), 1.0):
                    failures.append(f"row {w}: {s}")
                if not np.array_equal(hist[w], np.arange(HIST_BINS) + w):
                    failures.append(f"histogram {w}")
        polled_barrier(comm)
    agree(comm, failures)
