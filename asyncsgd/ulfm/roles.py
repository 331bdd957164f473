"""Who is who after a shrink: ranks of one communicator in another (``rank_map``) and Downpour's roles re-assigned
over the survivors (``reassign_roles``: the store keeps its layout, a worker moves up to host a dead server's shard).
"""
from __future__ import annotations

from mpi4py import MPI

__all__ = ["rank_map", "Role", "reassign_roles"]


def rank_map(old_comm, new_comm) -> dict:
    """Return ``{old rank: new rank or None}`` for every rank of ``old_comm`` (None: not in ``new_comm``)."""
    old_group, new_group = old_comm.Get_group(), new_comm.Get_group()
    try:
        ranks = list(range(old_group.Get_size()))
        now = MPI.Group.Translate_ranks(old_group, ranks, new_group)
    finally:
        old_group.Free()
        new_group.Free()
    return {old: (None if n == MPI.UNDEFINED else int(n)) for old, n in zip(ranks, now)}


class Role(tuple):
    """``(kind, index)``: kind 'server' (index = shard) or 'worker' (index = worker number)."""

    __slots__ = ()

    def __new__(cls, kind: str, index: int):
        return super().__new__(cls, (kind, int(index)))

    @classmethod
    def of(cls, rank: int, n_servers: int) -> "Role":
        """The role of ``rank`` in a job whose ranks ``0..n_servers-1`` host the shards."""
        return cls("server", rank) if rank < n_servers else cls("worker", rank - n_servers)

    @property
    def kind(self) -> str:
        return self[0]

    @property
    def index(self) -> int:
        return self[1]

    def __repr__(self):
        return f"Role({self.kind!r}, {self.index})"


def reassign_roles(old_size: int, failed, n_servers: int) -> dict:
    """Re-assign roles after a shrink: return ``{old rank: (new rank, old Role, new Role)}`` for each survivor.

    Ranks ``0..n_servers-1`` host the shards before and after (the store keeps its layout), so when a server dies
    the first surviving worker moves up to host a shard, and every worker index is renumbered densely.  Raises
    ValueError when fewer than ``n_servers + 1`` ranks survive (no worker left) or rank 0 died (it holds the
    monitor and the version counter; see docs/FAULT_TOLERANCE.md).
    """
    failed = set(int(r) for r in failed)
    if 0 in failed:
        raise ValueError("rank 0 died: it runs the monitor and hosts the version counter; the job cannot go on "
                         "(restart it with --resume from the last checkpoint)")
    alive = [r for r in range(old_size) if r not in failed]
    if len(alive) <= n_servers:
        raise ValueError(f"only {len(alive)} ranks survive: {n_servers} servers need at least one worker")
    return {old: (new, Role.of(old, n_servers), Role.of(new, n_servers)) for new, old in enumerate(alive)}
