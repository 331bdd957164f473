"""Helpers for the multi-rank tests: every rank collects its failure messages, then all ranks agree on them."""
from __future__ import annotations

__all__ = ["agree"]


def agree(comm, failures):
    """Fail on every rank when any rank recorded a failure message (an allgather: call it on every rank)."""
    gathered = comm.allgather(list(failures))
    messages = [f"rank {rank}: {msg}" for rank, msgs in enumerate(gathered) for msg in msgs]
    assert not messages, "\n".join(messages)
