"""The environment a rank starts with: every ``ASYNCSGD_*`` switch and the launcher's rank and size variables.

(Two readers live with what they configure: ``ulfm.policy`` reads Open MPI's ``OMPI_MCA_mpi_ft_enable`` marker and
``backends.threads`` the BLAS thread counts this module sets; ``testing.launch`` builds child environments.)

- What the MPI launcher tells a process before MPI starts: its rank and the ranks per node (``launcher_value``);
  ``limit_blas_threads`` runs when asyncsgd is imported (and again in ``python -m asyncsgd.train``), so scripts
  that import asyncsgd before numpy get the same per-rank BLAS threads as the command line.
- The ``ASYNCSGD_*`` switches (docs/ARCHITECTURE.md lists them): the store transport, the compiled CPU kernels,
  CPU-only 'auto' devices, the heartbeat timeout and the fault-injection points (a test tool).  Each has one
  reader here; a bad value is a ValueError that a run checks before any work.
"""
from __future__ import annotations

import os

__all__ = ["RANK_VARIABLES", "SIZE_VARIABLES", "launcher_value", "limit_blas_threads", "STORE_ENV", "TRANSPORTS",
           "store_transport", "CPU_KERNELS_ENV", "cpu_kernels_switch", "force_cpu", "heartbeat_timeout", "FAULT_ENV",
           "fault_spec"]

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


# ---- ASYNCSGD_* ---------------------------------------------------------------------------------------------------
STORE_ENV = "ASYNCSGD_STORE"              # the Downpour store's transport when a caller names none (docs/NETWORK.md)
TRANSPORTS = ("rma", "messages")
CPU_KERNELS_ENV = "ASYNCSGD_CPU_KERNELS"   # the compiled CPU kernels of the fused conv + pool: 1 (default) or 0
FAULT_ENV = "ASYNCSGD_FAULT"              # fault points (asyncsgd.runtime.faults; a test tool)
_FORCE_CPU_ENV = "ASYNCSGD_FORCE_CPU"     # 1: every --device auto runs on the CPU
_HEARTBEAT_ENV = "ASYNCSGD_HEARTBEAT_TIMEOUT"  # s without a heartbeat before a rank counts as silent (default 15)
_ON, _OFF = ("1", "on", "yes", "true"), ("0", "off", "no", "false")


def store_transport(environ=None) -> str:
    """The transport ``ASYNCSGD_STORE`` names ("rma" when unset); ValueError for anything else (checked before a run
    starts, so a typo is a usage error and not a traceback from inside the job)."""
    environ = os.environ if environ is None else environ
    chosen = environ.get(STORE_ENV) or "rma"
    if chosen not in TRANSPORTS:
        raise ValueError(f"{STORE_ENV}={chosen!r} is not a store transport: use one of {', '.join(TRANSPORTS)}")
    return chosen


def cpu_kernels_switch(environ=None) -> bool:
    """What ``ASYNCSGD_CPU_KERNELS`` asks for: True (unset, empty, 1/on/yes/true) or False (0/off/no/false);
    ValueError for anything else, which a run checks before it starts (so a typo is a usage error, not a silent
    choice)."""
    value = (os.environ if environ is None else environ).get(CPU_KERNELS_ENV, "").strip().lower()
    if value in _ON or not value:
        return True
    if value in _OFF:
        return False
    raise ValueError(f"{CPU_KERNELS_ENV}={value!r} is not a switch: use 1 (the compiled CPU kernels where they are "
                     f"built, the default) or 0 (numpy only)")


def force_cpu() -> bool:
    """True when ``ASYNCSGD_FORCE_CPU=1``: a device 'auto' then means the CPU (GPU machines running CPU tests)."""
    return os.environ.get(_FORCE_CPU_ENV) == "1"


def heartbeat_timeout() -> float:
    """Seconds without a heartbeat after which rank 0 treats a rank as silent (``ASYNCSGD_HEARTBEAT_TIMEOUT``, 15)."""
    return float(os.environ.get(_HEARTBEAT_ENV, "15"))


def fault_spec() -> str:
    """The fault points ``ASYNCSGD_FAULT`` names (unparsed; asyncsgd.runtime.faults reads it once per process)."""
    return os.environ.get(FAULT_ENV, "")
