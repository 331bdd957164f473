"""Data set tools: ``python -m asyncsgd.data {fsdd,mnist,synthetic,check} ...``.

  fsdd --recordings PATH --out FILE        FSDD recordings (.tar.gz or folder of wav) -> log-mel HDF5
  mnist --idx-dir DIR --out FILE           the four MNIST gzip IDX files -> HDF5
  synthetic --n N --out FILE               synthetic:N written to HDF5 (for scale benchmarks)
  check FILE|fsdd|synthetic:N              validate and print a summary

Bad input (a missing or invalid file, a bad option) prints one line ``error: ...`` and exits with status 2.
"""
from __future__ import annotations

import argparse
import sys

import numpy as np

from asyncsgd.data.h5format import DataError

EXIT_DATA = 2


def _positive_int(s):
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def _gzip_level(s):
    v = int(s)
    if not 0 <= v <= 9:
        raise argparse.ArgumentTypeError(f"gzip level must be 0 (none) to 9, got {s}")
    return v or None


def build_parser() -> argparse.ArgumentParser:
    """Return the argument parser of the data tools."""
    p = argparse.ArgumentParser(prog="python -m asyncsgd.data",
                                description="Build, convert and check asyncsgd HDF5 data sets.")
    sub = p.add_subparsers(dest="command", required=True)

    f = sub.add_parser("fsdd", help="log-mel features of the Free Spoken Digit Dataset")
    f.add_argument("--recordings", required=True, help="recordings.tar.gz or a folder of {digit}_{speaker}_{i}.wav")
    f.add_argument("--out", required=True, help="HDF5 file to write")
    f.add_argument("--frames", type=_positive_int, default=64, help="frames per example (10 ms each; default 64)")
    f.add_argument("--float32", action="store_true", help="store float32 instead of float16")
    f.add_argument("--mantissa-bits", type=int, default=None,
                   help="round float16 to this many mantissa bits (0-10) for a smaller file; default: no rounding")

    m = sub.add_parser("mnist", help="MNIST from the four gzip IDX files")
    m.add_argument("--idx-dir", required=True, help="folder holding train-/t10k- images and labels .gz files")
    m.add_argument("--out", required=True, help="HDF5 file to write")
    m.add_argument("--float16", action="store_true", help="store float16 instead of float32 (half the size)")
    m.add_argument("--limit", type=_positive_int, default=None, help="keep only the first N rows of each split")
    m.add_argument("--gzip", type=_gzip_level, default=1, metavar="LEVEL",
                   help="gzip level 1-9, 0 for uncompressed (default 1)")

    s = sub.add_parser("synthetic", help="write synthetic:N to a file")
    s.add_argument("--n", type=_positive_int, required=True, help="training examples (test: max(10, N // 5))")
    s.add_argument("--out", required=True, help="HDF5 file to write")
    s.add_argument("--seed", type=int, default=0, help="generator seed (default 0, the one 'synthetic:N' uses)")
    s.add_argument("--float16", action="store_true", help="store float16 instead of float32")
    s.add_argument("--gzip", type=_gzip_level, default=None, metavar="LEVEL",
                   help="gzip level 1-9, 0 for uncompressed (default 0)")

    c = sub.add_parser("check", help="validate a data set and print a summary")
    c.add_argument("spec", help="HDF5 path, 'fsdd' or 'synthetic:N'")
    return p


def run(args) -> int:
    """Run one parsed command; return the exit status (raises DataError/ValueError on bad input)."""
    if args.command == "fsdd":
        from asyncsgd.data.fsdd import convert_fsdd
        if args.mantissa_bits is not None and (args.float32 or not 0 <= args.mantissa_bits <= 10):
            raise ValueError("--mantissa-bits takes 0-10 and applies to float16 storage only")
        convert_fsdd(args.recordings, args.out, frames=args.frames,
                     dtype=np.float32 if args.float32 else np.float16, mantissa_bits=args.mantissa_bits)
    elif args.command == "mnist":
        from asyncsgd.data.mnist import convert_mnist
        convert_mnist(args.idx_dir, args.out, dtype=np.float16 if args.float16 else np.float32, limit=args.limit,
                      compress=args.gzip)
    elif args.command == "synthetic":
        import time
        from asyncsgd.data.synthetic import write_synthetic
        t0 = time.perf_counter()
        counts = write_synthetic(args.out, args.n, seed=args.seed,
                                 dtype=np.float16 if args.float16 else np.float32, compress=args.gzip)
        print(f"wrote {args.out}: {counts['train']} train + {counts['test']} test rows, 1x40x64, "
              f"in {time.perf_counter() - t0:.1f} s")
    elif args.command == "check":
        check(args.spec)
    return 0


def check(spec: str):
    """Validate ``spec`` (reading every label and feature) and print its summary."""
    from asyncsgd.data.h5format import validate_file
    from asyncsgd.data.source import open_source, resolve_path
    if spec.startswith("synthetic:"):
        print(open_source(spec).describe())
        return
    print(validate_file(resolve_path(spec)).describe())


def main(argv=None) -> int:
    """Entry point: parse, run, and turn DataError/ValueError/OSError into one line on stderr and exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (DataError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_DATA


if __name__ == "__main__":
    sys.exit(main())
