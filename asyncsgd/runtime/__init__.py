"""What every rank of a job runs besides its algorithm: the environment (``env``: every ``ASYNCSGD_*`` switch and
the launcher's variables), MPI helpers for waiting and failing as one job (``mpi``), the heartbeat watchdog
(``watchdog``) and the named fault points that tests fire (``faults``)."""
