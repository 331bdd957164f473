"""Train your own CNN (my_cnn.small_cnn) with Downpour SGD on the bundled spoken-digit features, from Python.

    mpirun -n 4 python examples/train_downpour.py                 # 1 parameter server + 3 replicas, FSDD
    mpirun -n 4 python examples/train_downpour.py --out model.h5  # where the trained model goes
    python examples/predict.py model.h5                           # use it

Every rank runs this same script; ``train_downpour`` returns the result on rank 0 and None on the others.
``--data synthetic:300 --steps 20`` makes a quick smoke run (the test suite uses it).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # my_cnn.py sits next to this script

import asyncsgd  # noqa: E402
from my_cnn import small_cnn  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="fsdd", help="'fsdd' (bundled), an HDF5 file, or synthetic:N")
    p.add_argument("--epochs", type=float, default=20)
    p.add_argument("--steps", type=int, default=None, help="steps per replica instead of epochs (smoke runs)")
    p.add_argument("--out", default="small_cnn.h5", help="model file written by rank 0")
    args = p.parse_args()

    options = asyncsgd.DownpourOptions(lr=0.005, momentum=0.9, batch_size=32, n_push=2,
                                       staleness=asyncsgd.ExponentialDecay(0.9), seed=1)
    if args.steps is not None:
        stop = asyncsgd.Stop(steps=args.steps)
    else:
        stop = asyncsgd.Stop(epochs=args.epochs, target_accuracy=0.98)
    result = asyncsgd.train_downpour(small_cnn, args.data, options, stop, progress="lines")
    if result is not None:  # rank 0
        result.save_model(args.out)
        print(f"test accuracy {result.test_accuracy:.4f} after {result.summary['epochs']:.1f} epochs "
              f"({result.summary.get('stop_reason') or 'stopped'}); model written to {args.out}")


if __name__ == "__main__":
    main()
