"""The Downpour parameter store: ``ShardedParameters`` over MPI one-sided windows, kept moving by a progress thread."""
from .counter import VersionCounter
from .progress import ProgressThread
from .sharded import ShardedParameters, shard_bounds

__all__ = ["ShardedParameters", "shard_bounds", "VersionCounter", "ProgressThread"]
