"""A network of your own: a small CNN for log-mel spoken digits, built from asyncsgd's layers.

A model factory takes the per-example input shape (C, H, W), the number of classes, the rank's compute object
(``ops``) and a seed, and returns a ``Network``.  asyncsgd builds it once on every rank from the same seed, so every
replica starts from the same parameters.  The command line finds it as ``--model my_cnn:small_cnn`` (run from this
folder, or with it on PYTHONPATH).
"""
from asyncsgd.model import Conv2D, Dense, Dropout, Flatten, MaxPool2D, Network, ReLU


def small_cnn(input_shape, n_classes, *, ops, seed=0):
    """conv 3x3 (16) -> pool 2 -> relu -> conv 3x3 (32) -> pool 2 -> relu -> dense 96 -> relu -> dropout 0.25 ->
    dense n_classes.  For FSDD's (1, 40, 64) log-mel inputs: 497,386 parameters, most in the first dense layer
    (32 x 10 x 16 activations -> 96)."""
    layers = [Conv2D(16, 3, pad=1), MaxPool2D(2), ReLU(),
              Conv2D(32, 3, pad=1), MaxPool2D(2), ReLU(),
              Flatten(), Dense(96), ReLU(), Dropout(0.25), Dense(n_classes)]
    return Network("small_cnn", layers, input_shape, n_classes, ops=ops, seed=seed)
