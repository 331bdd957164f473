"""Every CUDA source compiles with nvcc, defines exactly the kernels the loader expects, and the loader finds it.

These run without a GPU: the compile tests need only nvcc (skipped where it is absent) and the loader tests nothing
but the package.  The kernels' results are checked against numpy on a GPU in tests/backends/test_cuda_kernels.py.
"""
import importlib.util
import re
import shutil
import subprocess
import sys

import pytest

from asyncsgd.backends import cuda_kernels as kernels

NVCC = shutil.which("nvcc")
ENTRY = re.compile(r"\.entry\s+(\w+)\s*\(")
EXTERN_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(')


def _expected_entries(source):
    return {f"{name}_{suffix}" for name in kernels.KERNELS[source] for suffix in ("f32", "f64")}


@pytest.mark.skipif(NVCC is None, reason="nvcc is not installed")
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
@pytest.mark.parametrize("source", sorted(kernels.KERNELS))
def test_kernel_source_compiles_with_nvcc(source, arch, tmp_path):
    ptx = tmp_path / f"{source}.ptx"
    # The loader's NVRTC options, warnings as errors, and no implicit host headers used by the code (NVRTC has none).
    cmd = [NVCC, f"-arch={arch}", "--ptx", *kernels.NVRTC_OPTIONS, "-Werror", "all-warnings",
           "-o", str(ptx), str(kernels.source_path(source))]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(cmd)} failed:\n{done.stdout}{done.stderr}"
    entries = set(ENTRY.findall(ptx.read_text()))
    assert entries == _expected_entries(source)


@pytest.mark.parametrize("source", sorted(kernels.KERNELS))
def test_sources_define_exactly_the_listed_kernels(source):
    text = kernels.read_source(source)
    assert set(EXTERN_KERNEL.findall(text)) == _expected_entries(source)
    assert not re.search(r"^\s*#\s*include", text, re.M), "NVRTC compiles these without host headers"


def test_loader_finds_every_cu_file_in_the_checkout():
    found = {p.name for p in kernels._checkout_dir().glob("*.cu")}
    assert found == {f"{name}.cu" for name in kernels.KERNELS}
    for name in kernels.KERNELS:
        assert kernels.source_path(name).is_file()


def test_loader_prefers_the_installed_package(tmp_path, monkeypatch):
    # An installed asyncsgd.kernels package (setup.py's package_dir) holding copies of the sources.
    pkg = tmp_path / "kernels_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    for name in kernels.KERNELS:
        shutil.copy(kernels._checkout_dir() / f"{name}.cu", pkg / f"{name}.cu")
    spec = importlib.util.spec_from_file_location("asyncsgd.kernels", pkg / "__init__.py",
                                                  submodule_search_locations=[str(pkg)])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setitem(sys.modules, "asyncsgd.kernels", module)
    monkeypatch.setattr(kernels, "_checkout_dir", lambda: tmp_path / "nowhere")
    for name in kernels.KERNELS:
        assert str(kernels.source_path(name)) == str(pkg / f"{name}.cu")
    (pkg / "sparse.cu").unlink()
    with pytest.raises(FileNotFoundError, match="sparse.cu"):
        kernels.source_path("sparse")


def test_loader_rejects_unknown_names_and_dtypes():
    with pytest.raises(ValueError, match="unknown kernel source"):
        kernels.source_path("nope")
    with pytest.raises(ValueError, match="no kernel 'nope'"):
        kernels.kernel("conv", "nope", "float32")
    with pytest.raises(TypeError, match="float32 or float64 arrays, got float16"):
        kernels.dtype_suffix("float16")
    assert kernels.dtype_suffix("float32") == "f32" and kernels.dtype_suffix("float64") == "f64"
    assert kernels.launch_blocks(0) == 1 and kernels.launch_blocks(257) == 2


def test_gpu_package_imports_without_cupy():
    # A fresh interpreter that cannot import cupy at all: the modules import; using them says what is missing.
    code = (
        "import sys; sys.modules['cupy'] = None\n"
        "import asyncsgd.backends, asyncsgd.backends.cuda_kernels, asyncsgd.backends.cuda_sparse, asyncsgd.backends.cupy_ops\n"
        "from asyncsgd.model import build_model\n"
        "try:\n"
        "    asyncsgd.backends.cupy_ops.CupyOps()\n"
        "except RuntimeError as e:\n"
        "    print('refused:', e)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert "refused: CupyOps needs CuPy" in done.stdout
