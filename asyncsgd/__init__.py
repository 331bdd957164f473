"""asyncsgd: asynchronous distributed training of convolutional networks over MPI.

Downpour SGD and Sandblaster L-BFGS (Dean et al. 2012) with the sparse, momentum and staleness-decayed updates of
Chan & Lane (2014), on numpy CPU ranks and CuPy GPU ranks.  The parameter store is a set of MPI one-sided windows.
"""
__version__ = "0.1.0"
__all__ = ["__version__"]
