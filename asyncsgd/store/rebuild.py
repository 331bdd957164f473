"""Re-host a parameter store on a shrunk communicator after a rank died (see asyncsgd.ulfm.primitives): a
``ShardedParameters`` (windows) or a ``ServedParameters`` (shards served by threads; built with
``fault_tolerant=True`` its threads serve on through a dead client until the store is abandoned), rebuilt as the
same kind.

Open MPI documents one-sided windows as working only until the first failure, so the old store is abandoned, never
used again nor freed (its free is collective over a communicator that holds a dead rank), and a new store with the
same shard layout (``n_params``, ``n_servers``; shard i on rank i) is built on the survivors:

- a shard whose host survived is copied out of the old window by its host (a ``Get`` from itself: exact, since every
  survivor's pushes completed with a ``Flush`` before it entered the shrink) and sent to the shard's new host;
- a shard whose host died is taken from the freshest replica: the survivor whose last fetch saw the newest version
  sends that slice of its fetched copy; ``lost_pushes`` = version at the rebuild - that replica's version;
- the version numbering continues: the new store's counter starts at the old version (``ShardedParameters(...,
  version=V)``), so versions fetched before and after the rebuild compare directly.

The old store is read through ``ShardedParameters.local_shard()`` and dropped with ``ShardedParameters.abandon()``.
Adagrad stores are not rebuilt yet (a lost shard's sums have no replica).
"""
from __future__ import annotations

import dataclasses
import time

import numpy
from mpi4py import MPI

from asyncsgd.store.base import DTYPE
from asyncsgd.store.sharded import ShardedParameters

__all__ = ["Rebuilt", "rebuild", "abandon"]

_TAG = 7301
_POLL_SLEEP = 0.001


@dataclasses.dataclass
class Rebuilt:
    """What ``rebuild`` returns on every survivor."""

    store: ShardedParameters   # the new store on the shrunk communicator
    version_base: int          # the old store's version at the rebuild (the new store's counter starts there)
    lost_pushes: int           # pushes that landed only on a lost shard after its replica was fetched
    restored: tuple            # shard indices restored from a replica (their hosts died)
    replica_rank: int | None   # rank of the new communicator whose replica was used (None: no shard lost)


def abandon(store: ShardedParameters):
    """Stop ``store``'s progress thread and never touch its windows again (no collective free)."""
    store.abandon()


def _wait(requests, timeout: float, what: str):
    start = time.monotonic()
    while not MPI.Request.Testall(requests):
        if time.monotonic() - start > timeout:
            raise TimeoutError(f"store rebuild: {what} did not complete within {timeout:.0f} s")
        time.sleep(_POLL_SLEEP)


def rebuild(old_store: ShardedParameters, old_rank: int, new_comm, failed, *, version: int | None,
            replica=None, timeout: float = 60.0, local=None) -> Rebuilt:
    """Build the store again on ``new_comm`` (collective over it); return a Rebuilt.

    ``old_rank``: this rank's rank in the old store's communicator.  ``failed``: the old ranks that died (the same
    list everywhere, from ``ulfm.primitives.survivors``).  ``version``: the old store's version, read by new rank 0
    (which must be old rank 0, the counter's host) before anything else; other ranks pass None.
    ``replica``: ``(vector float32 [n_params], version)`` this rank last fetched, or None (servers).
    ``local``: this rank's copy of the shard it hosted (``old_store.local_shard()``, read before an earlier attempt
    abandoned the store), or None to read it now.  A second failure during a rebuild is run through by calling this
    again on the next shrink with every old rank that died so far in ``failed`` (``new_comm`` is then a shrink of a
    shrink: its ranks are still the old survivors in their old order).
    Every wait is bounded by ``timeout`` seconds.
    """
    if old_store.adagrad:
        raise ValueError("rebuilding an Adagrad store is not supported: a lost shard's sums have no replica")
    failed = sorted(set(int(r) for r in failed))
    n_servers = old_store.n_servers
    bounds = old_store.bounds
    me = new_comm.rank
    if new_comm.size < n_servers:  # whether a worker is left is the trainer's question (ulfm.roles.reassign_roles)
        raise ValueError(f"{new_comm.size} survivors cannot host {n_servers} shards")
    # The old store's version travels from rank 0; replicas' versions are gathered to choose the freshest.
    offer = -1 if replica is None else int(replica[1])
    info = numpy.array([offer, -1 if version is None else int(version)], numpy.int64)
    everyone = numpy.empty((new_comm.size, 2), numpy.int64)
    _wait([new_comm.Iallgather([info, MPI.INT64_T], [everyone, MPI.INT64_T])], timeout, "allgather of versions")
    version_now = int(everyone[0, 1])
    if version_now < 0:
        raise ValueError("new rank 0 must pass the old store's version (it hosts the counter)")
    # Old rank -> new rank of each survivor, from the agreed failed list.
    alive = [r for r in range(new_comm.size + len(failed)) if r not in failed]
    new_of = {old: new for new, old in enumerate(alive)}
    restored = tuple(shard for shard in range(n_servers) if shard in failed)
    replica_rank = None
    replica_version = version_now
    if restored:
        replica_rank = int(numpy.argmax(everyone[:, 0]))  # first rank with the newest version
        replica_version = int(everyone[replica_rank, 0])
        if replica_version < 0:
            raise RuntimeError(f"shards {list(restored)} were lost and no survivor holds a replica of them")
    # Route every shard to its new host (new rank == shard index): from its old host, or from the replica.
    sends, recvs, initial = [], [], None
    keep = []  # origin buffers live until their sends complete
    if me < n_servers:
        initial = numpy.zeros(old_store.n_params, DTYPE)
    for shard, (start, stop) in enumerate(bounds):
        source = replica_rank if shard in restored else new_of[shard]
        if me == source:
            piece = (numpy.ascontiguousarray(replica[0][start:stop], DTYPE) if shard in restored
                     else old_store.local_shard() if local is None else numpy.ascontiguousarray(local, DTYPE))
            if shard == me:
                initial[start:stop] = piece
            else:
                keep.append(piece)
                sends.append(new_comm.Isend([piece, MPI.FLOAT], dest=shard, tag=_TAG + shard))
        elif me == shard:
            recvs.append(new_comm.Irecv([initial[start:stop], MPI.FLOAT], source=source, tag=_TAG + shard))
    _wait(sends + recvs, timeout, "shard transfer")
    abandon(old_store)
    # the same transport as before: windows (ShardedParameters) or served shards (ServedParameters)
    extra = {"fault_tolerant": True} if getattr(old_store, "fault_tolerant", False) else {}
    store = type(old_store)(new_comm, old_store.n_params, n_servers=n_servers, initial=initial,
                            version=version_now, **extra)
    lost = version_now - replica_version if restored else 0
    return Rebuilt(store=store, version_base=version_now, lost_pushes=lost, restored=restored,
                   replica_rank=replica_rank)
