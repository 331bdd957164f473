"""``python -m asyncsgd.evaluate MODEL.h5``: test loss and accuracy of a saved model, and per-example predictions.

    python -m asyncsgd.evaluate model.h5                       # the data the model was trained on (its config)
    python -m asyncsgd.evaluate model.h5 --data fsdd --predictions preds.csv

The network is rebuilt from the file alone (``asyncsgd.model.load_model``: no user code needed) and evaluated in
float32 on the CPU in batches of 256, as the trainer evaluates: the figures equal the trainer's final ones for the
same parameters.  The predictions file has one row per test example: ``index,label,predicted,probability`` (the
softmax probability of the predicted class).  Bad input ends with one ``asyncsgd: error:`` line and exit status 2.
"""
from __future__ import annotations

import argparse
import sys

import numpy

__all__ = ["main", "evaluate_model"]

EXIT_USAGE = 2


class _Usage(ValueError):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise _Usage(message)


def _parser():
    p = _Parser(prog="python -m asyncsgd.evaluate",
                description="Print the test loss and accuracy of a saved asyncsgd model.")
    p.add_argument("model", help="model file written by --model-out or asyncsgd.model.save_model")
    p.add_argument("--data", default=None,
                   help="data set: 'fsdd', an HDF5 file or synthetic:N (default: the data the model trained on)")
    p.add_argument("--predictions", default=None, metavar="OUT.csv",
                   help="write one CSV row per test example: index,label,predicted,probability")
    p.add_argument("--batch-size", type=int, default=256, help="examples per forward pass (default 256)")
    return p


def _softmax_max(logits):
    shifted = logits - logits.max(axis=1, keepdims=True)
    e = numpy.exp(shifted)
    return e.max(axis=1) / e.sum(axis=1)


def evaluate_model(net, x, y, batch_size: int = 256):
    """Return ``(test_loss, accuracy, predicted, probability)`` of ``net`` on (x, y), ``batch_size`` rows at a time.

    ``test_loss`` and ``accuracy`` are ``net.evaluate``'s (the trainer's figures); ``predicted`` (M,) holds each
    example's argmax class and ``probability`` (M,) its softmax probability.
    """
    loss, accuracy = net.evaluate(x, y, batch_size=batch_size)
    predicted = numpy.empty(len(y), numpy.int64)
    probability = numpy.empty(len(y), numpy.float64)
    for start in range(0, len(y), batch_size):
        logits = net.ops.to_host(net.forward(x[start:start + batch_size])).astype(numpy.float64)
        predicted[start:start + len(logits)] = logits.argmax(axis=1)
        probability[start:start + len(logits)] = _softmax_max(logits)
    return loss, accuracy, predicted, probability


def _check_output(path):
    from asyncsgd.io.atomic import output_folder_problem
    problem = output_folder_problem(path)
    if problem is not None:
        raise _Usage(f"--predictions: {problem}")


def _prepare(args):
    """Load the model and the test set; raise _Usage/ValueError with one line for any bad input."""
    from asyncsgd.data import open_source
    from asyncsgd.model import load_model

    if args.batch_size < 1:
        raise _Usage(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.predictions is not None:
        _check_output(args.predictions)
    net = load_model(args.model)
    data = args.data or net.meta.get("config", {}).get("data")
    if not data:
        raise _Usage(f"{args.model} does not record its data set; give --data FILE|fsdd")
    src = open_source(data)
    if tuple(src.input_shape) != net.input_shape:
        raise _Usage(f"{data} holds {'x'.join(map(str, src.input_shape))} inputs but the model takes "
                     f"{'x'.join(map(str, net.input_shape))}; give the --data it was trained on")
    if src.n_classes > net.n_classes:
        raise _Usage(f"{data} has {src.n_classes} classes but the model predicts {net.n_classes}")
    x, y = src.test_set()
    if len(y) == 0:
        raise _Usage(f"{data} has no test examples")
    return net, data, x, y


def main(argv=None) -> int:
    try:
        args = _parser().parse_args(argv)
        net, data, x, y = _prepare(args)
    except (_Usage, ValueError) as exc:          # DataError and the model loader's errors are ValueErrors
        sys.stderr.write(f"asyncsgd: error: {exc}\n")
        return EXIT_USAGE
    loss, accuracy, predicted, probability = evaluate_model(net, x, y, args.batch_size)
    correct = int((predicted == numpy.asarray(y)).sum())
    if args.predictions is not None:
        from asyncsgd.io.atomic import atomic_path
        with atomic_path(args.predictions) as tmp:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write("index,label,predicted,probability\n")
                for i, (label, guess, prob) in enumerate(zip(numpy.asarray(y), predicted, probability)):
                    f.write(f"{i},{int(label)},{int(guess)},{prob:.6f}\n")
    print(f"model {net.factory} ({net.n_params} parameters) on {data}: {len(y)} test examples")
    print(f"test loss: {loss:.6f}")
    print(f"test accuracy: {accuracy:.4f} ({correct}/{len(y)} correct)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
