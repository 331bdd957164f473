"""A job board on rank 0: control flags and one row of statistics per worker, in one small RMA window.

Downpour workers never talk to rank 0's CPU: they publish their counters with one-sided writes, and read the stop
and warm-start flags with one-sided reads, so rank 0 can evaluate the model while they train.  Every access is an
element-wise atomic accumulate (REPLACE to write, NO_OP to read), so concurrent readers and writers never see torn
values; under fault tolerance (``lockless``) plain puts and gets and root's own memory instead, which no dead rank
can leave locked.  Values are float64 (integers are exact up to 2**53).
"""
from __future__ import annotations

import numpy
from mpi4py import MPI

from asyncsgd.rma.owner import WindowOwner

__all__ = ["JobBoard", "FLAG_STOP", "FLAG_WARM_DONE", "ROW_FIELDS", "HIST_BINS"]

FLAG_STOP = 0
FLAG_WARM_DONE = 1
_N_FLAGS = 4
HIST_BINS = 64  # staleness counts for tau = 0..62 and >= 63
ROW_FIELDS = ("steps", "samples", "pushes", "push_bytes", "pushed_entries", "skipped_nonfinite", "loss",
              "staleness_sum", "done", "compute_s", "elapsed_s", "resumed_samples", "first_version",
              "overlapped_calls")


class JobBoard(WindowOwner):
    """Flags and per-worker statistics of one job, hosted on ``root``.  Collective constructor over ``comm``.

    A ``with`` block frees it on success and leaves it alone on an exception (``WindowOwner``).
    """

    row_size = len(ROW_FIELDS) + HIST_BINS

    def __init__(self, comm, n_workers: int, *, root: int = 0, lockless: bool = False):
        # lockless (fault tolerance): no accumulate ever touches the window, since an accumulate takes the target's
        # lock (osc/sm, osc/rdma) and a rank killed inside one leaves it taken, hanging every later access (measured
        # on the multi-node cluster).  Root reads and writes its own memory; the others Put their own row (one
        # writer per row) and Get the flags.  A row read while it is being written may mix two publishes, field by
        # field; each aligned float64 is read whole.
        self.lockless = bool(lockless)
        self.comm = comm.Dup()
        self._own(self.comm)
        self.root = root
        self.n_workers = n_workers
        self.size = _N_FLAGS + n_workers * self.row_size
        nbytes = self.size * 8 if self.comm.rank == root else 0
        self.win = MPI.Win.Allocate(nbytes, 8, comm=self.comm)
        if self.comm.rank == root:
            numpy.frombuffer(self.win.tomemory(), dtype=numpy.float64)[:] = 0.0
        self.comm.Barrier()  # memory initialised locally before anyone's first access
        self.win.Lock_all()
        self._freed = False

    def _check(self):
        if self._freed:
            raise RuntimeError("JobBoard used after free()")

    def _local(self):
        return numpy.frombuffer(self.win.tomemory(), dtype=numpy.float64)

    def _write(self, offset: int, values):
        self._check()
        buf = numpy.ascontiguousarray(values, dtype=numpy.float64)
        if self.lockless and self.comm.rank == self.root:
            self._local()[offset:offset + buf.size] = buf
        elif self.lockless:
            self.win.Put(buf, self.root, target=(offset, buf.size, MPI.DOUBLE))
        else:
            self.win.Accumulate(buf, self.root, target=(offset, buf.size, MPI.DOUBLE), op=MPI.REPLACE)
        self.win.Flush(self.root)

    def _read(self, offset: int, count: int):
        self._check()
        if self.lockless and self.comm.rank == self.root:
            return self._local()[offset:offset + count].copy()
        out = numpy.empty(count, dtype=numpy.float64)
        if self.lockless:
            self.win.Get(out, self.root, target=(offset, count, MPI.DOUBLE))
            self.win.Flush(self.root)
            return out
        dummy = numpy.empty(count, dtype=numpy.float64)
        self.win.Get_accumulate(dummy, out, self.root, target=(offset, count, MPI.DOUBLE), op=MPI.NO_OP)
        self.win.Flush(self.root)
        return out

    def set_flag(self, flag: int, value: float = 1.0):
        self._write(flag, [value])

    def flag(self, flag: int) -> float:
        return float(self._read(flag, 1)[0])

    def publish(self, worker: int, stats: dict, hist):
        """Write worker ``worker``'s row: the ROW_FIELDS of ``stats`` and its staleness histogram (HIST_BINS)."""
        row = numpy.zeros(self.row_size)
        row[:len(ROW_FIELDS)] = [stats.get(k, 0.0) for k in ROW_FIELDS]
        row[len(ROW_FIELDS):] = hist
        self._write(_N_FLAGS + worker * self.row_size, row)

    def rows(self) -> tuple[list[dict], numpy.ndarray]:
        """Return every worker's statistics (dicts) and their staleness histograms, shape (workers, HIST_BINS)."""
        raw = self._read(_N_FLAGS, self.n_workers * self.row_size).reshape(self.n_workers, self.row_size)
        stats = [dict(zip(ROW_FIELDS, r[:len(ROW_FIELDS)].tolist())) for r in raw]
        return stats, raw[:, len(ROW_FIELDS):]

    def free(self):
        """Release the window (collective); a second call does nothing."""
        if self._freed:
            return
        self._freed = True
        self.win.Unlock_all()
        self.win.Free()
        self.comm.Free()
