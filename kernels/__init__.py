"""CUDA C sources of asyncsgd's GPU kernels, installed as ``asyncsgd.kernels`` (see setup.py)."""
