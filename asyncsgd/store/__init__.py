"""The Downpour parameter store.

- ``base``: ``ParameterStore``, the interface, argument checks and staleness bookkeeping every store shares, the
  shard layout (``shard_bounds``), the chunking of transfers and the Adagrad step (``adagrad_step``);
- ``sharded``: ``ShardedParameters``, the shards in MPI one-sided windows (kept moving by a progress thread);
- ``served``: ``ServedParameters``, the same interface over two-sided messages served by a thread;
- ``rebuild``: re-creates a ``ShardedParameters`` on the survivors of a failure.

``open_store`` picks the transport."""
from __future__ import annotations

from asyncsgd.runtime.env import TRANSPORTS, store_transport
from asyncsgd.store.base import ParameterStore, shard_bounds
from asyncsgd.store.served import ServedParameters
from asyncsgd.store.sharded import ShardedParameters

__all__ = ["ParameterStore", "ShardedParameters", "ServedParameters", "open_store", "shard_bounds"]


def open_store(comm, n_params: int, *, transport: str | None = None, **kwargs):
    """Return a ``ShardedParameters`` (``transport="rma"``) or a ``ServedParameters`` (``"messages"``).

    ``transport=None`` reads ``ASYNCSGD_STORE`` (unset: "rma").  Every rank of ``comm`` must pick the same one.
    The other keyword arguments are those of ``ShardedParameters``, plus ``fault_tolerant`` (the served store's
    threads then serve on through a dead client).
    """
    chosen = transport if transport is not None else store_transport()
    if chosen not in TRANSPORTS:
        raise ValueError(f"transport={chosen!r} is not a store transport: use one of {', '.join(TRANSPORTS)}")
    if chosen == "messages":
        return ServedParameters(comm, n_params, **kwargs)
    kwargs.pop("fault_tolerant", None)  # the RMA store needs no switch: its windows are simply abandoned
    return ShardedParameters(comm, n_params, **kwargs)
