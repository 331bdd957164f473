"""HDF5 data sets for training: the file format and its validation, per-worker slices, mini-batch streams,
log-mel speech features, and converters (FSDD, MNIST, synthetic).

    src = open_source("fsdd")            # or a path to .h5, or "synthetic:N"; raises DataError on bad data
    x, y = src.train_slice(rank, n_workers)
    for xb, yb in BatchStream(x, y, batch_size=32, seed=rank): ...

Command line: ``python -m asyncsgd.data {fsdd,mnist,synthetic,check}`` (see ``__main__``).
"""
from asyncsgd.data.h5format import DataError, FileSummary, validate_file, write_dataset
from asyncsgd.data.source import BatchStream, DataSource, H5Source, open_source, resolve_path

__all__ = ["DataError", "FileSummary", "validate_file", "write_dataset", "BatchStream", "DataSource", "H5Source",
           "open_source", "resolve_path"]
