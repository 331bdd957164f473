"""Periodic checkpoints of a training run and the resumption from one (``--checkpoint-every``, ``--resume``).

What each mode keeps (all in one ``asyncsgd.io.checkpoint`` file, written atomically):

- serial and sync: parameters, momentum, samples and steps done;
- downpour: the store's parameters and Adagrad sums, its version counter, and the samples each worker had done.
  Worker momentum is not kept: replicas restart it from zero, as after any fetch of DistBelief's Downpour.

Resuming continues the epoch and step budgets from the saved position, with the shuffling re-seeded from it, so a
run killed and resumed trains on as many samples as one that was never interrupted.  (Downpour's ``--steps`` count
each job's steps again; its ``--epochs`` carry over.)  A Downpour run stopped on purpose (``--stop-file``, a job
near its time limit: asyncsgd.runtime.stop_request) writes its final checkpoint like a finished one, with
``stop_reason`` 'preempted' in the summary; ``--resume auto`` continues it.
"""
from __future__ import annotations

import os
import time

from asyncsgd.plan import RESUMABLE_MODES  # the plan refuses checkpoints in the other modes (check_inputs)
from asyncsgd.runtime.mpi import UsageError

__all__ = ["checkpoint_path", "load_resume", "Checkpointer", "RESUMABLE_MODES"]

DEFAULT_CHECKPOINT = "checkpoint.h5"


def checkpoint_path(ck) -> str | None:
    """The file checkpoints go to (``ck`` a CheckpointOptions or None): its path, else checkpoint.h5 when a period
    or ``resume='auto'`` is given."""
    if ck is None:
        return None
    if ck.path:
        return ck.path
    if ck.every is not None or ck.resume == "auto":
        return DEFAULT_CHECKPOINT
    return None


def load_resume(ck, mode: str, model_name: str, n_params: int):
    """Return the checkpoint to resume from (or None): ``ck.resume`` a path, or 'auto' when the file exists.

    Raises UsageError for a missing, corrupt or mismatched file.  (A mode outside RESUMABLE_MODES never gets here:
    asyncsgd.plan.check_inputs refuses its checkpoint options.)
    """
    from asyncsgd.io.checkpoint import load_checkpoint

    if ck is None or ck.resume is None:
        return None
    path = checkpoint_path(ck) if ck.resume == "auto" else ck.resume
    if ck.resume == "auto" and not os.path.exists(path):
        return None  # nothing to resume yet: start afresh
    if not os.path.exists(path):
        raise UsageError(f"--resume: checkpoint {path} does not exist")
    try:
        ckpt = load_checkpoint(path, expect_model=model_name, expect_n_params=n_params)
    except ValueError as exc:
        raise UsageError(f"--resume: {exc}") from None
    saved_mode = ckpt.config.get("mode")
    if saved_mode != mode:
        raise UsageError(f"--resume: {path} was written by --mode {saved_mode}; this run is --mode {mode}")
    return ckpt


class Checkpointer:
    """Write checkpoints every ``ck.every`` seconds and once at the end (when a path is configured).

    ``config`` is the run's options as a plain dict (it must hold 'mode'); it is stored in every checkpoint.
    """

    def __init__(self, ck, n_params: int, seeds: dict, *, model_name: str = "model", config: dict | None = None):
        self.path = checkpoint_path(ck)
        self.every = None if ck is None else ck.every
        self.n_params = n_params
        self.seeds = seeds
        self.model_name = model_name
        self.config = dict(config or {})
        self.last = time.monotonic()
        self.written = 0

    def due(self) -> bool:
        return self.path is not None and self.every is not None and time.monotonic() - self.last >= self.every

    def save(self, *, params, state: dict, version: int, data_position: dict):
        if self.path is None:
            return
        from asyncsgd.io.checkpoint import save_checkpoint

        save_checkpoint(self.path, params=params, state=state, version=int(version), config=self.config,
                        data_position=data_position, seeds=self.seeds, model_name=self.model_name,
                        n_params=self.n_params)
        self.last = time.monotonic()
        self.written += 1
