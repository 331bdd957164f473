"""A network of your own: a small CNN for log-mel spoken digits, built from asyncsgd's layers.

A model factory takes the per-example input shape (C, H, W), the number of classes, the rank's compute object
(``ops``) and a seed, and returns a ``Network``.  asyncsgd builds it once on every rank from the same seed, so every
replica starts from the same parameters.  The command line finds it as ``--model my_cnn:small_cnn`` (run from this
folder, or with it on PYTHONPATH).
"""
from asyncsgd.model import Conv2D, Dense, Dropout, Flatten, MaxPool2D, Network, ReLU


def small_cnn(input_shape, n_classes, *, ops, seed=0):
    """conv 3x3 (12) -> pool 2 -> relu -> conv 3x3 (24) -> pool 2 -> relu -> dense 64 -> relu -> dropout 0.2 ->
    dense n_classes.  For FSDD's (1, 40, 64) log-mel inputs: 249,210 parameters, most in the first dense layer
    (24 x 10 x 16 activations -> 64)."""
    layers = [Conv2D(12, 3, pad=1), MaxPool2D(2), ReLU(),
              Conv2D(24, 3, pad=1), MaxPool2D(2), ReLU(),
              Flatten(), Dense(64), ReLU(), Dropout(0.2), Dense(n_classes)]
    return Network("small_cnn", layers, input_shape, n_classes, ops=ops, seed=seed)
