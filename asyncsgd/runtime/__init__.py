"""What every rank of a job runs besides its algorithm: the environment (``env``: every variable asyncsgd reads),
MPI helpers for waiting and failing as one job (``mpi``), the heartbeat watchdog (``watchdog``) and the named fault
points that tests fire (``faults``)."""
