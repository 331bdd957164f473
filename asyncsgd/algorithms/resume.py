"""Periodic checkpoints of a training run and the resumption from one (``--checkpoint-every``, ``--resume``).

What each mode keeps (all in one ``asyncsgd.ops.checkpoint`` file, written atomically):

- serial and sync: parameters, momentum, samples and steps done;
- downpour: the store's parameters and Adagrad sums, its version counter, and the samples each worker had done.
  Worker momentum is not kept: replicas restart it from zero, as after any fetch of DistBelief's Downpour.

Resuming continues the epoch and step budgets from the saved position, with the shuffling re-seeded from it, so a
run killed and resumed trains on as many samples as one that was never interrupted.
"""
from __future__ import annotations

import os
import time

from ..config import config_to_dict
from ..mpiutil import UsageError

__all__ = ["checkpoint_path", "load_resume", "Checkpointer", "RESUMABLE_MODES"]

RESUMABLE_MODES = ("serial", "sync", "downpour")
DEFAULT_CHECKPOINT = "checkpoint.h5"


def checkpoint_path(cfg) -> str | None:
    """The file checkpoints go to: --checkpoint, else checkpoint.h5 when --checkpoint-every is given."""
    if cfg.checkpoint:
        return cfg.checkpoint
    if cfg.checkpoint_every is not None or cfg.resume == "auto":
        return DEFAULT_CHECKPOINT
    return None


def load_resume(cfg, n_params: int):
    """Return the checkpoint to resume from (or None): --resume PATH, or --resume auto when the file exists.

    Raises UsageError for a missing, corrupt or mismatched file, or a mode that cannot resume.
    """
    from ..ops.checkpoint import load_checkpoint

    if cfg.resume is None:
        return None
    if cfg.mode not in RESUMABLE_MODES:
        raise UsageError(f"--resume is not supported with --mode {cfg.mode}; it works with "
                         f"{', '.join(RESUMABLE_MODES)}")
    path = checkpoint_path(cfg) if cfg.resume == "auto" else cfg.resume
    if cfg.resume == "auto" and not os.path.exists(path):
        return None  # nothing to resume yet: start afresh
    try:
        ckpt = load_checkpoint(path, expect_model=cfg.model, expect_n_params=n_params)
    except ValueError as exc:
        raise UsageError(f"--resume: {exc}") from None
    saved_mode = ckpt.config.get("mode")
    if saved_mode != cfg.mode:
        raise UsageError(f"--resume: {path} was written by --mode {saved_mode}; this run is --mode {cfg.mode}")
    return ckpt


class Checkpointer:
    """Write checkpoints every ``--checkpoint-every`` seconds and once at the end (when a path is configured)."""

    def __init__(self, cfg, n_params: int, seeds: dict):
        self.cfg = cfg
        self.path = checkpoint_path(cfg)
        self.every = cfg.checkpoint_every
        self.n_params = n_params
        self.seeds = seeds
        self.last = time.monotonic()
        self.written = 0

    def due(self) -> bool:
        return self.path is not None and self.every is not None and time.monotonic() - self.last >= self.every

    def save(self, *, params, state: dict, version: int, data_position: dict):
        if self.path is None:
            return
        from ..ops.checkpoint import save_checkpoint

        save_checkpoint(self.path, params=params, state=state, version=int(version), config=config_to_dict(self.cfg),
                        data_position=data_position, seeds=self.seeds, model_name=self.cfg.model,
                        n_params=self.n_params)
        self.last = time.monotonic()
        self.written += 1
