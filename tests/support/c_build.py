"""Whether this machine can build the optional C extension (kernels/conv_pool_cpu.c): a C compiler and Python's
headers, what pip's build of ``_asyncsgd_cpu`` needs."""
import os
import shutil
import sysconfig


def can_build_c_extensions() -> bool:
    cc = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(cc) is not None and os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h"))
