"""The raw output of a benchmark run: what was measured, with the command, date and machine that produced it.

Every figure in docs/BENCHMARKS.md comes from a ``--json-out`` file written here and committed under
docs/benchmarks/, so a reader can check each number against its raw output and rerun the command.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import sys
import time

__all__ = ["machine", "write"]


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine() -> dict:
    """The facts a timing depends on: cores, CPU model, Python, numpy, the MPI mpi4py loaded, the load average."""
    info = {"cpus": os.cpu_count(), "cpu_model": _cpu_model(), "python": platform.python_version(),
            "loadavg": list(os.getloadavg())}
    try:
        import numpy
        info["numpy"] = numpy.__version__
    except ImportError:
        pass
    try:
        if "mpi4py.MPI" not in sys.modules:
            # a launcher (bench_peers, bench_seeds) must not become an MPI process itself: MPI_Get_library_version
            # may be called before MPI_Init, so name the library without initialising MPI
            import mpi4py
            mpi4py.rc.initialize = mpi4py.rc.finalize = False
        from mpi4py import MPI
        info["mpi"] = MPI.Get_library_version().splitlines()[0].strip()
    except Exception:  # no MPI here: the figure does not depend on it
        info["mpi"] = None
    return info


def write(path, results, *, started_load=None) -> None:
    """Write ``results`` (JSON-able) to ``path`` with the command line, the UTC date and the machine."""
    if not path:
        return
    payload = {"command": " ".join(shlex.quote(a) for a in [os.path.relpath(sys.argv[0])] + sys.argv[1:]),
               "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()), "machine": machine(),
               "loadavg_at_start": started_load, "results": results}
    with open(path, "w", encoding="utf-8") as f:
        json.dump(payload, f, indent=1, default=float)
        f.write("\n")
