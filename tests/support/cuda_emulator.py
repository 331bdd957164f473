"""Run asyncsgd's GPU code on the CPU for tests: the .cu kernels compiled by g++ and a numpy stand-in for CuPy.

``fake_cupy()`` returns a module named ``cupy`` whose arrays are numpy arrays with CuPy's ``.get()`` and whose
``RawModule`` compiles the CUDA source it is given with g++ and tests/support/cuda_emulator.h (one std::thread per CUDA
thread, real barriers and warp shuffles).  Patched in as ``asyncsgd.backends.device.import_cupy``, it lets the unchanged
wrappers of asyncsgd.backends launch the unchanged kernels on a machine without a GPU.  Each launch checks that every
argument has exactly the C type of the kernel's parameter (numpy.int32 for ``int``, a C-contiguous float32 array
for ``float*``, ...), since CuPy passes raw bytes and a wrong type would be a silent bug on a real GPU.

Grid-stride kernels are launched on a small grid (3 blocks of at most 64 threads) whatever the wrapper asks: any
grid is correct for them, and a small one exercises their loops; tile kernels (one block per tile) get the grid
they ask for.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import types
from pathlib import Path

import numpy

HEADER = Path(__file__).with_name("cuda_emulator.h")
TILE_KERNELS = ("band_counts_", "compact_")      # need their exact grid and block (see kernels/sparse.cu)
_EMU_GRID, _EMU_BLOCK = 3, 64
_KERNEL = re.compile(r'extern\s+"C"\s+__global__\s+void\s+(\w+)\s*\(([^)]*)\)', re.S)
_SCALARS = {"int": (ctypes.c_int, numpy.int32), "long long": (ctypes.c_longlong, numpy.int64),
            "unsigned int": (ctypes.c_uint, numpy.uint32), "unsigned long long": (ctypes.c_ulonglong, numpy.uint64),
            "float": (ctypes.c_float, numpy.float32), "double": (ctypes.c_double, numpy.float64)}
_POINTEES = {"float": numpy.float32, "double": numpy.float64, "int": numpy.int32, "long long": numpy.int64,
             "unsigned int": numpy.uint32, "unsigned long long": numpy.uint64, "unsigned char": numpy.uint8}
_BUILD_DIR = Path(tempfile.gettempdir()) / f"asyncsgd-cuda-emulator-{os.getuid()}"
_LIBS = {}


def compiler():
    """Return the path of g++, or None."""
    return shutil.which("g++")


def _parse_params(text):
    """Return [(kind, numpy type)] for a kernel's parameter list; kind is 'pointer' or 'scalar'."""
    params = []
    for raw in text.split(","):
        decl = " ".join(raw.replace("__restrict__", " ").replace("const", " ").split())
        pointer = "*" in decl
        ctype = " ".join(decl.replace("*", " ").split()[:-1])       # drop the parameter name
        if pointer:
            params.append(("pointer", _POINTEES[ctype]))
        else:
            params.append(("scalar", _SCALARS[ctype]))
    return params


def _build(code: str):
    """Compile ``code`` (a .cu source) into a shared library of launchers; return (CDLL, {name: params})."""
    kernels = {name: _parse_params(params) for name, params in _KERNEL.findall(code)}
    digest = hashlib.sha256((code + HEADER.read_text()).encode()).hexdigest()[:16]
    if digest in _LIBS:
        return _LIBS[digest], kernels
    _BUILD_DIR.mkdir(exist_ok=True)
    lib_path = _BUILD_DIR / f"kernels-{digest}.so"
    if not lib_path.exists():
        runners = "\n".join(
            f'extern "C" void emu_{name}(unsigned int grid, unsigned int block'
            + "".join(f", decltype(emu::param<{i}>({name})) a{i}" for i in range(len(params)))
            + f") {{ emu::launch({name}, grid, block" + "".join(f", a{i}" for i in range(len(params))) + "); }"
            for name, params in kernels.items())
        # emu_<name>(grid, block, params...) with the kernel's own parameter types, read back by decltype.
        source = (f'#include "{HEADER}"\n#include <tuple>\n{code}\n'
                  "namespace emu {\n"
                  "template <int I, typename... P> std::tuple_element_t<I, std::tuple<P...>> param(void (*)(P...));\n"
                  "}\n" + runners + "\n")
        src_path = _BUILD_DIR / f"kernels-{digest}.{os.getpid()}.cpp"     # private: several ranks may build at once
        src_path.write_text(source)
        tmp = lib_path.with_suffix(f".{os.getpid()}.tmp")
        cmd = [compiler(), "-std=c++20", "-O1", "-pthread", "-shared", "-fPIC", "-o", str(tmp), str(src_path)]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            raise RuntimeError(f"g++ could not build the CPU emulation of the kernels:\n{done.stderr}")
        os.replace(tmp, lib_path)
        src_path.unlink()
    lib = ctypes.CDLL(str(lib_path))
    _LIBS[digest] = lib
    return lib, kernels


class FakeArray(numpy.ndarray):
    """A numpy array standing in for cupy.ndarray: ``.get()`` returns a numpy copy."""

    def get(self, out=None):
        if out is not None:
            numpy.copyto(out, self)
            return out
        return numpy.array(self, copy=True)


def _device(a):
    return a.view(FakeArray) if isinstance(a, numpy.ndarray) and not isinstance(a, FakeArray) else a


class FakeKernel:
    """A cupy.RawKernel stand-in: checks argument types against the C signature, then runs the emulated kernel."""

    def __init__(self, name, function, params):
        self.name = name
        self.function = function
        self.params = params
        self.function.argtypes = [ctypes.c_uint, ctypes.c_uint] + [
            ctypes.c_void_p if kind == "pointer" else t[0] for kind, t in params]
        self.function.restype = None

    def __call__(self, grid, block, args):
        if len(args) != len(self.params):
            raise TypeError(f"{self.name} takes {len(self.params)} arguments, got {len(args)}")
        values = []
        for i, ((kind, want), arg) in enumerate(zip(self.params, args)):
            if kind == "pointer":
                if not isinstance(arg, numpy.ndarray) or arg.dtype != want:
                    raise TypeError(f"{self.name} argument {i}: expected a {numpy.dtype(want)} array, got "
                                    f"{getattr(arg, 'dtype', type(arg).__name__)}")
                if not arg.flags.c_contiguous:
                    raise ValueError(f"{self.name} argument {i}: array is not C-contiguous")
                values.append(arg.ctypes.data)
            else:
                if type(arg) is not want[1]:
                    raise TypeError(f"{self.name} argument {i}: expected {want[1].__name__}, got "
                                    f"{type(arg).__name__}")
                values.append(arg.item())
        g, b = int(grid[0]), int(block[0])
        if not self.name.startswith(TILE_KERNELS):
            g, b = min(g, _EMU_GRID), min(b, _EMU_BLOCK)
        self.function(g, b, *values)


class FakeRawModule:
    """A cupy.RawModule stand-in compiling ``code`` with g++ and the emulator header."""

    def __init__(self, code, options=()):
        self.options = tuple(options)
        self.lib, self.kernels = _build(code)

    def get_function(self, name):
        if name not in self.kernels:
            raise AttributeError(f"no kernel {name!r} in the module")
        return FakeKernel(name, getattr(self.lib, f"emu_{name}"), self.kernels[name])


class _FakeCupy(types.ModuleType):
    """Module ``cupy`` over numpy: named functions return FakeArray; anything else falls back to numpy."""

    def __getattr__(self, name):
        obj = getattr(numpy, name)
        if callable(obj) and not isinstance(obj, type):
            def wrapped(*args, **kwargs):
                return _device(obj(*args, **kwargs))
            wrapped.__name__ = name
            return wrapped
        return obj


def fake_cupy():
    """Return a new stand-in for the cupy module (needs g++ when a RawModule is built)."""
    cp = _FakeCupy("cupy")
    cp.emulated = True
    cp.ndarray = FakeArray
    cp.RawModule = FakeRawModule
    cp.asarray = lambda a, dtype=None: _device(numpy.array(a, dtype=dtype, copy=True))
    cp.asnumpy = lambda a: numpy.array(a, copy=True)
    cp.ascontiguousarray = lambda a, dtype=None: _device(numpy.ascontiguousarray(a, dtype=dtype))
    cp.stack = lambda arrays, axis=0: _device(numpy.stack(arrays, axis=axis))
    rng = numpy.random.default_rng(12345)
    cp.random = types.SimpleNamespace(
        randint=lambda low, high=None, size=None: _device(numpy.asarray(rng.integers(low, high, size))))
    return cp
