"""Running through dead ranks with Open MPI's ULFM (docs/FAULT_TOLERANCE.md), one concept per module:

- ``policy``: whether a run is fault tolerant (``--fault-tolerance``, the ULFM launch marker);
- ``primitives``: notice a dead rank, safe points, revoke + shrink to the survivors, agreement, ending after one;
- ``roles``: ranks across a shrink and Downpour's roles re-assigned over the survivors;
- ``processes``: the processes behind ranks on this host (``/proc`` state; SIGKILL for a stopped one);
- ``recovery``: ``RecoveryBase``, what every mode's recovery shares, and the recovery timer;
- ``replica_guard``: ``ReplicaGuard``, sync's and Sandblaster's recovery (every rank a replica);
- ``stuck``: ``StuckCallGuard``, which ends a rank stuck inside one MPI one-sided call after a peer died.

Downpour's recovery is ``asyncsgd.algorithms.downpour.recovery``; the heartbeat window it watches is
``asyncsgd.rma.heartbeats``; ``--kill-ranks`` is ``asyncsgd.testing.kill``."""
