"""Running through dead ranks with Open MPI's ULFM (docs/FAULT_TOLERANCE.md): the primitives (detect, shrink,
re-map roles, heartbeats, ``primitives``) and sync's and Sandblaster's replica guard (``replica_guard``); Downpour's
recovery is ``asyncsgd.algorithms.downpour.recovery``."""
