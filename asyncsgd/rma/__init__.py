"""One-sided helpers, one window-owning object per file, each built the same way (collective constructor, idempotent
``free()``, a context manager whose error path runs no collective; ``owner.WindowOwner``):

- ``counter.VersionCounter``: the store's push counters (atomic ``Fetch_and_op``);
- ``board.JobBoard``: Downpour's control flags and per-worker statistics on rank 0;
- ``progress_thread.ProgressThread``: keeps passive-target RMA moving on a rank that computes;
- ``heartbeats.Heartbeats``: every rank's heartbeat counter on rank 0, so a silent (stopped) rank can be found.
"""
