"""Downpour SGD: ``worker`` (the replica, the training loop, rank 0's monitor and the warm start), ``overlap``
(the communication thread of ``--overlap``) and ``recovery`` (running through dead ranks under ULFM)."""
from asyncsgd.algorithms.downpour.worker import run

__all__ = ["run"]
