"""Tools for tests and benchmarks, shipped so users' own test suites can use them: starting MPI jobs with the
mpiexec that matches mpi4py's MPI (``launch``) and killing chosen ranks mid-run (``kill``, behind ``--kill-ranks``).
Fault points themselves live in ``asyncsgd.runtime.faults``."""
