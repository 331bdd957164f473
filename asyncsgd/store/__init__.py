"""The Downpour parameter store: ``ShardedParameters`` over MPI one-sided windows, kept moving by a progress thread,
or ``ServedParameters`` (the same interface over two-sided messages served by a thread); ``open_store`` picks one."""
from .counter import VersionCounter
from .progress import ProgressThread
from .served import ServedParameters, open_store
from .sharded import ShardedParameters, shard_bounds

__all__ = ["ShardedParameters", "ServedParameters", "open_store", "shard_bounds", "VersionCounter", "ProgressThread"]
