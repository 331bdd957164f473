"""What the MPI launcher tells a process before MPI starts: its rank and the ranks per node (environment variables).

``limit_blas_threads`` runs when asyncsgd is imported (and again in ``python -m asyncsgd.train``), so scripts
that import asyncsgd before numpy get the same per-rank BLAS threads as the command line.
"""
from __future__ import annotations

import os

__all__ = ["RANK_VARIABLES", "SIZE_VARIABLES", "launcher_value", "limit_blas_threads"]

RANK_VARIABLES = ("PMI_RANK", "OMPI_COMM_WORLD_RANK", "PMIX_RANK", "SLURM_PROCID")
SIZE_VARIABLES = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")
_LOCAL_SIZE_VARIABLES = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "SLURM_NTASKS_PER_NODE")
_BLAS_THREAD_VARIABLES = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


def launcher_value(names, default):
    """Read this process's rank or size from the launcher's environment, before MPI is initialised."""
    for name in names:
        if os.environ.get(name, "").isdigit():
            return int(os.environ[name])
    return default


def limit_blas_threads():
    """Give each rank its share of the node's cores for BLAS, unless the user chose (before numpy loads).

    Several ranks per node each starting a BLAS thread per core oversubscribe the node: 6 ranks on 2 cores ran
    8.6x slower with OpenBLAS's default threads than with one each.
    """
    if any(v in os.environ for v in _BLAS_THREAD_VARIABLES):
        return
    local = launcher_value(_LOCAL_SIZE_VARIABLES, None) or launcher_value(SIZE_VARIABLES, 1)
    if local <= 1:
        return
    threads = str(max(1, (os.cpu_count() or 1) // local))
    for name in _BLAS_THREAD_VARIABLES:
        os.environ[name] = threads
