"""Sandblaster L-BFGS: ``coordinator`` (the run: rank 0 coordinates, every rank a replica and a shard owner),
``lbfgs`` (the sharded two-loop recursion), ``linesearch`` (strong Wolfe) and ``minishards`` (the dynamic scheduler
with backup copies)."""
from asyncsgd.algorithms.sandblaster.coordinator import run

__all__ = ["run"]
