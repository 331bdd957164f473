"""Load a trained model and use it: test accuracy and per-example predictions.

    python examples/predict.py small_cnn.h5                 # on the bundled FSDD test set
    python examples/predict.py small_cnn.h5 --data my.h5 --show 20

The model file records the network's layers, input shape and classes (and the factory's import path, here
``my_cnn:small_cnn``), so ``asyncsgd.load_model`` rebuilds the network with no code of yours.
"""
import argparse

import numpy

import asyncsgd
from asyncsgd.data import open_source


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", help="model file written by train_downpour.py or python -m asyncsgd.train")
    p.add_argument("--data", default="fsdd", help="data set whose test split is predicted")
    p.add_argument("--show", type=int, default=10, help="print this many predictions")
    args = p.parse_args()

    net = asyncsgd.load_model(args.model)
    x, y = open_source(args.data).test_set()
    loss, accuracy = net.evaluate(x, y)
    logits = numpy.concatenate([net.forward(x[i:i + 256]) for i in range(0, len(y), 256)])
    predicted = logits.argmax(axis=1)
    print(f"test accuracy {accuracy:.4f}, test loss {loss:.4f} on {len(y)} examples")
    for i in range(min(args.show, len(y))):
        print(f"example {i}: predicted {predicted[i]}, label {y[i]}")


if __name__ == "__main__":
    main()
