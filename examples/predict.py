"""Load a trained model and use it: test accuracy and per-example predictions.

    python examples/predict.py small_cnn.h5                 # on the bundled FSDD test set
    python examples/predict.py small_cnn.h5 --data my.h5 --show 20

The model file records the network's factory by its import path (here ``my_cnn:small_cnn``), its input shape and
classes, so the network is rebuilt with no code of yours beyond the factory being importable.
"""
import argparse
import os
import sys

import numpy

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # so that my_cnn:small_cnn imports

from asyncsgd.api import build_network  # noqa: E402
from asyncsgd.backend import select_backend  # noqa: E402
from asyncsgd.data import open_source  # noqa: E402
from asyncsgd.ops.modelio import load_model  # noqa: E402


def load(path, device="cpu"):
    """Return the trained Network stored in ``path``."""
    # TODO(merge): asyncsgd.load_model(path) does all of this.
    params, meta = load_model(path)
    net = build_network(meta["model"], meta["input_shape"], meta["n_classes"], select_backend(device))
    net.params[...] = net.ops.xp.asarray(params)
    return net


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="model file written by train_downpour.py or python -m asyncsgd.train")
    p.add_argument("--data", default="fsdd", help="data set whose test split is predicted")
    p.add_argument("--show", type=int, default=10, help="print this many predictions")
    args = p.parse_args()

    net = load(args.model)
    x, y = open_source(args.data).test_set()
    loss, accuracy = net.evaluate(x, y)
    logits = numpy.concatenate([net.forward(x[i:i + 256]) for i in range(0, len(y), 256)])
    predicted = logits.argmax(axis=1)
    print(f"test accuracy {accuracy:.4f}, test loss {loss:.4f} on {len(y)} examples")
    for i in range(min(args.show, len(y))):
        print(f"example {i}: predicted {predicted[i]}, label {y[i]}")


if __name__ == "__main__":
    main()
