"""Packaging test: a regular (non-editable) ``pip install`` of this tree into a fresh virtualenv works on its own.

The source tree is copied first (so the build can neither see nor leave files in the checkout), installed with
``pip install --no-deps`` into a new virtualenv, and the installed copy is checked from a folder outside the source
tree: it imports, ships every ``kernels/*.cu`` as ``asyncsgd.kernels``, finds the bundled data set and has its
compiled CPU kernels (and an install where the C compiler fails still succeeds, without them).  The
dependencies (numpy, h5py, mpi4py) are borrowed from the running environment through a .pth file, which Python
reads after the new virtualenv's own site-packages, so the fresh ``asyncsgd`` is the one imported.
The build itself uses pip's isolated build environment (setuptools and wheel from the package index), as
``pip install .`` does for a user.
"""
from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import textwrap

import pytest

from asyncsgd.testing.launch import mpi_env
from c_build import can_build_c_extensions
from paths import REPO as ROOT

pytestmark = pytest.mark.slow

_TOP_LEVEL_SKIPPED = {".git", "build", "dist", "runs", ".pytest_cache", ".whl", ".gl"}

PROBE = textwrap.dedent("""
    import json, importlib.resources, os
    import asyncsgd, asyncsgd.kernels
    kernels = {p.name: p.read_bytes().hex() for p in importlib.resources.files("asyncsgd.kernels").iterdir()
               if p.name.endswith(".cu")}
    info = {"file": asyncsgd.__file__, "version": asyncsgd.__version__, "kernels": kernels}
    if os.environ.get("PROBE_CPU") == "1":
        from asyncsgd.backends import cpu_kernels
        from asyncsgd.backends.numpy_ops import NumpyOps
        mod = cpu_kernels._module()
        info["cpu"] = {"file": None if mod is None else mod.__file__, "on": NumpyOps().cpu_kernels_on}
    if os.environ.get("PROBE_DATA") == "1":
        from asyncsgd.data import open_source, resolve_path
        src = open_source("fsdd")
        info["data"] = {"path": resolve_path("fsdd"), "n_train": src.n_train, "n_test": src.n_test}
    print(json.dumps(info))
""")


def _ignore(folder, names):
    """Leave out what a build must not see: VCS data, virtualenvs, build products, caches."""
    skipped = {n for n in names if n == "__pycache__" or n.endswith((".egg-info", ".pyc"))}
    if os.path.samefile(folder, ROOT):
        skipped |= {n for n in names if n in _TOP_LEVEL_SKIPPED or n.startswith(".venv")}
    return skipped


def _run(argv, **kwargs):
    proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, argv))} failed ({proc.returncode}):\n{proc.stdout}"
    return proc.stdout


def _install(base, **env):
    """Return the path of a fresh virtualenv under ``base`` holding a non-editable install of this tree."""
    src, env_dir = base / "src", base / "venv"
    shutil.copytree(ROOT, src, ignore=_ignore)
    _run([sys.executable, "-m", "venv", "--without-pip", str(env_dir)], timeout=60)
    python = env_dir / "bin" / "python"
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    clean.update(env)
    _run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-input", str(src)],
         env=clean, timeout=240)
    purelib = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                   env=clean, timeout=60).strip()
    borrowed = [p for p in site.getsitepackages() if os.path.isdir(p)]
    with open(os.path.join(purelib, "zz_borrowed_dependencies.pth"), "w") as f:
        f.write("\n".join(borrowed) + "\n")
    return env_dir


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    """Return the path of a fresh virtualenv holding a non-editable install of this tree."""
    return _install(tmp_path_factory.mktemp("packaging"))


def _probe(venv, tmp_path, *, data=False, cpu=False) -> dict:
    env = mpi_env({k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "ASYNCSGD_CPU_KERNELS")})
    env["PROBE_DATA"] = "1" if data else "0"
    env["PROBE_CPU"] = "1" if cpu else "0"
    out = _run([str(venv / "bin" / "python"), "-c", PROBE], cwd=tmp_path, env=env, timeout=120)
    return json.loads(out.strip().splitlines()[-1])


def test_installed_copy_imports_outside_the_source_tree(venv, tmp_path):
    import asyncsgd
    info = _probe(venv, tmp_path)
    assert os.path.realpath(info["file"]).startswith(os.path.realpath(venv)), info["file"]
    assert info["version"] == asyncsgd.__version__


def test_installed_copy_ships_every_cuda_kernel(venv, tmp_path):
    sources = {name: open(os.path.join(ROOT, "kernels", name), "rb").read().hex()
               for name in os.listdir(os.path.join(ROOT, "kernels")) if name.endswith(".cu")}
    installed = _probe(venv, tmp_path)["kernels"]
    assert sorted(installed) == sorted(sources)
    assert installed == sources, "installed kernels differ from kernels/*.cu"


def test_installed_copy_finds_the_bundled_data_set(venv, tmp_path):
    bundled = os.path.join(ROOT, "data", "fsdd.h5")
    if not os.path.exists(bundled):
        pytest.skip("this tree has no data/fsdd.h5 to ship")
    data = _probe(venv, tmp_path, data=True)["data"]
    assert os.path.realpath(data["path"]).startswith(os.path.realpath(venv)), data["path"]
    assert os.path.getsize(data["path"]) == os.path.getsize(bundled)
    assert data["n_train"] > 0 and data["n_test"] > 0


def test_console_script_runs(venv, tmp_path):
    script = venv / "bin" / "asyncsgd-train"
    assert script.exists(), "setup.py's console script asyncsgd-train was not installed"
    env = mpi_env({k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    out = _run([str(script), "--help"], cwd=tmp_path, env=env, timeout=120)
    assert "usage" in out.lower()


def test_installed_copy_has_its_compiled_cpu_kernels(venv, tmp_path):
    if not can_build_c_extensions():
        pytest.skip("no C compiler or Python headers: pip installs the numpy path only")
    cpu = _probe(venv, tmp_path, cpu=True)["cpu"]
    assert cpu["file"] and os.path.realpath(cpu["file"]).startswith(os.path.realpath(venv)), cpu
    assert cpu["on"], "the installed NumpyOps does not use its compiled kernels"


def test_install_without_a_c_compiler_still_works(tmp_path_factory, tmp_path):
    """The extension is optional: with a compiler that always fails the install succeeds and runs the numpy path."""
    no_cc = _install(tmp_path_factory.mktemp("packaging_no_cc"), CC="false")
    assert not list(no_cc.glob("lib/python*/site-packages/_asyncsgd_cpu*")), "built with a failing compiler?"
    cpu = _probe(no_cc, tmp_path, cpu=True)["cpu"]
    # The borrowed dependencies' folder may hold another install's module (CI's own); never this venv's.
    assert cpu["file"] is None or not os.path.realpath(cpu["file"]).startswith(os.path.realpath(no_cc)), cpu
