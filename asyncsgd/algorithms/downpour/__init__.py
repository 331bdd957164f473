"""Downpour SGD: ``training`` (run: every rank's role, the store and the job board, rank 0's summary), ``worker``
(the replica ``DownpourWorker``: fetch, step, push; the worker loop and the warm start), ``monitor`` (rank 0:
evaluations, checkpoints, the stop flag), ``overlap`` (the communication thread of ``--overlap``) and ``recovery``
(running through dead ranks under ULFM)."""
from asyncsgd.algorithms.downpour.training import run

__all__ = ["run"]
