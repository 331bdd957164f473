"""Pieces every SGD trainer shares: default hyper-parameters, when to stop, the validation split, evaluation on the
validation and test sets with the best-model tracker, and the learning-rate schedule's run budget."""
from __future__ import annotations

import dataclasses
import math
import time

import numpy

from asyncsgd.data.holdout import split_holdout
from asyncsgd.runtime.faults import fault_point
from asyncsgd.data.partition import class_strided_rows
from asyncsgd.schedule import RunBudget, Warmup
from asyncsgd.algorithms.best_model import BestModelTracker

__all__ = ["sgd_defaults", "options_as_trained", "StopRule", "Evaluator", "TrainingSplit", "Evaluations",
           "schedule_budget"]

# Defaults that train each model well with momentum 0.9 (the measured runs are in the README, "Benchmarks").
_DEFAULTS = {
    # model: (lr for sgd, lr for adagrad, batch, epochs)
    "speech_cnn": (0.01, 0.01, 32, 30),
    "mnist_cnn": (0.01, 0.01, 64, 3),
    "logreg": (0.01, 0.05, 64, 20),
}

# Downpour with more replicas than this halves the model's default batch (and rate): see sgd_defaults.
ASYNC_HALF_BATCH_ABOVE = 3


def sgd_defaults(opts, stop, model_name: str, async_replicas: int = 1, sync_replicas: int = 1):
    """Return ``(opts, stop)`` with the options left unset (None) filled with the model's defaults (new objects).

    With ``async_replicas`` W > 2 Downpour replicas the default SGD learning rate is scaled by 2/W: their steps land
    on the store concurrently, each with its own momentum, so the effective step grows with W.  Measured on FSDD
    with 5 workers at a constant rate: lr 0.01 drove the network to a constant output, 0.004 reached 98.7% test
    accuracy in 73 s.  Under a schedule with a warm-up (the default ``warmup:0.05+cosine``) the first pushes run at a
    tenth of the peak, and the peak is scaled by 3/W instead (0.006 for 5 workers): on FSDD, seeds 10-12, the last
    models reached 0.990-0.997 test accuracy against 0.983-0.997 at 0.004.
    With ``sync_replicas`` W all-reduce replicas (``--mode sync``) the default SGD rate is multiplied by sqrt(W):
    a step averages W batches, so a run of the same epochs takes W times fewer steps, each with less gradient noise
    (the square-root rule).  Measured on FSDD with 4 replicas, 30 epochs: at peak 0.01 the last models of seeds 0-4
    and 10 reached 0.980-0.990 test accuracy; at 0.02 (= 0.01 x sqrt(4)) seed 10 reached 0.993, seed 11 0.990-0.993
    over its last evaluations (docs/SCHEDULES.md, section 8).
    With W > 3 Downpour replicas (SGD at the store) the model's batch is also halved when not given, and the
    default rate with it (linear scaling: the same rate per sample): twice the pushes, each of half the samples, so
    a push that lands tau pushes late is half as many samples stale.  Measured on FSDD with 5 workers, 30 epochs,
    seeds 5-9: test errors (of 300) averaged 4.0 at batch 64 (lr 0.012), 2.4 at 32 (0.006), 1.2 at 16 (0.003);
    seeds 0-4 at 16: 2.0 against 2.4 at 32 (docs/SCHEDULES.md, section 11).  A run takes ~10% longer.
    A model that is not built in (a user factory) gets lr 0.01, batch 32 and 10 epochs.
    """
    lr_sgd, lr_ada, batch, epochs = _DEFAULTS.get(model_name, (0.01, 0.01, 32, 10))
    fill = {}
    halve = async_replicas > ASYNC_HALF_BATCH_ABOVE and opts.batch_size is None and opts.optimizer != "adagrad"
    if halve:
        batch = max(1, batch // 2)
    if opts.lr is None:
        share = 3.0 if isinstance(getattr(opts, "lr_schedule", None), Warmup) else 2.0
        fill["lr"] = lr_ada if opts.optimizer == "adagrad" else (
            lr_sgd * min(1.0, share / max(async_replicas, 1)) * math.sqrt(max(sync_replicas, 1))
            * (0.5 if halve else 1.0))
    if opts.momentum is None:
        fill["momentum"] = 0.0 if opts.optimizer == "adagrad" else 0.9
    if opts.batch_size is None:
        fill["batch_size"] = batch
    if not stop.is_set():
        stop = dataclasses.replace(stop, epochs=epochs)
    return dataclasses.replace(opts, **fill), stop


class StopRule:
    """Decide when training ends from a ``Stop``: epochs (of the whole training set), steps, a time limit, a target
    accuracy.

    ``samples_budget`` is epochs x the samples this trainer is responsible for (a worker's slice, or all of them).
    """

    def __init__(self, stop, samples_per_epoch: int, start: float | None = None):
        self.max_samples = None if stop.epochs is None else int(math.ceil(stop.epochs * samples_per_epoch))
        self.max_steps = stop.steps
        self.time_limit = stop.time_limit
        self.target = stop.target_accuracy
        self.start = time.monotonic() if start is None else start
        self.reason = None

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def done(self, samples: int, steps: int, accuracy: float | None = None) -> bool:
        """Return True (and set ``reason``) once any limit is reached."""
        if self.max_samples is not None and samples >= self.max_samples:
            self.reason = "epochs"
        elif self.max_steps is not None and steps >= self.max_steps:
            self.reason = "steps"
        elif self.time_limit is not None and self.elapsed() >= self.time_limit:
            self.reason = "time-limit"
        elif self.target is not None and accuracy is not None and accuracy >= self.target:
            self.reason = "target-accuracy"
        return self.reason is not None

    def stop_early(self) -> bool:
        """Record that early stopping (``Stop.patience``) ended the run; return True."""
        self.reason = self.reason or "patience"
        return True

    def fraction(self, samples: int, steps: int) -> float | None:
        """Fraction of the run done, for the ETA, when a limit other than accuracy is known."""
        parts = []
        if self.max_samples:
            parts.append(samples / self.max_samples)
        if self.max_steps:
            parts.append(steps / self.max_steps)
        if self.time_limit:
            parts.append(self.elapsed() / self.time_limit)
        return min(1.0, max(parts)) if parts else None


class Evaluator:
    """Test-set loss and accuracy of a parameter vector, on a private replica (rank 0's)."""

    def __init__(self, net, x_test, y_test, backend):
        self.net = net
        self.x = backend.to_device(x_test)
        self.y = backend.to_device(y_test)
        self.backend = backend

    def __call__(self, params_host) -> tuple[float, float]:
        fault_point("evaluate")
        self.net.params[...] = self.backend.to_device(params_host)
        loss, acc = self.net.evaluate(self.x, self.y)
        return float(loss), float(acc)


class TrainingSplit:
    """The run's training rows and held-out validation rows (``SGDOptions.validation``), the same on every rank.

    Every rank computes the split itself from the training labels and the seed (asyncsgd.data.holdout), so no
    communication is needed and a resumed run gets the same split.  ``share(w, W)`` is worker w's class-strided
    share of the *training* rows (asyncsgd.data.partition): disjoint, covering, never a validation row.  With fraction 0
    every row trains and ``share`` is exactly ``DataSource.train_slice``.
    """

    def __init__(self, src, fraction: float, seed: int):
        self.src = src
        self.labels = numpy.asarray(src.train_labels(), dtype=numpy.int64)
        self.train_rows, self.validation_rows = split_holdout(self.labels, fraction, seed=seed)
        self.n_train = int(self.train_rows.size)
        self.n_validation = int(self.validation_rows.size)

    def share_rows(self, part: int, n_parts: int):
        """Return worker ``part``'s training rows (file row indices, ascending)."""
        if n_parts > self.n_train:
            raise ValueError(f"cannot split {self.n_train} training rows among {n_parts} workers: use fewer "
                             f"workers, a smaller --validation or more data")
        local = class_strided_rows(self.labels[self.train_rows], int(part), int(n_parts))
        return self.train_rows[local]

    def share(self, part: int, n_parts: int):
        """Return (x float32, y int64): worker ``part``'s share of the training rows."""
        if self.n_validation == 0:
            return self.src.train_slice(part, n_parts)
        fault_point("data")
        return self.src.train_rows(self.share_rows(part, n_parts))

    def validation_set(self):
        """Return (x, y) of the validation rows, or None without a split."""
        return self.src.train_rows(self.validation_rows) if self.n_validation else None


class Evaluations:
    """Rank 0's evaluations: one parameter snapshot scored on the validation rows (when held out) and the test set,
    handed to the best-model tracker; the accuracy that decides (target, patience, choice) is the validation one,
    or the test one without a split.
    """

    def __init__(self, net, split: TrainingSplit, backend, patience=None, selection_margin: float = 0.0):
        x_test, y_test = split.src.test_set()
        self.test = Evaluator(net, x_test, y_test, backend)
        val = split.validation_set()
        self.validation = None if val is None else Evaluator(net, *val, backend)
        self.tracker = BestModelTracker(patience=patience if self.validation is not None else None,
                                        selection_margin=selection_margin, n_validation=split.n_validation)
        self.n_validation = split.n_validation
        self.last = {}

    def __call__(self, params_host, **extra) -> dict:
        """Score ``params_host`` (a host vector not changed afterwards by the caller), track it; return the figures
        ({test_loss, test_accuracy[, validation_loss, validation_accuracy, best_validation_accuracy]})."""
        out = {}
        if self.validation is not None:
            out["validation_loss"], out["validation_accuracy"] = self.validation(params_host)
        out["test_loss"], out["test_accuracy"] = self.test(params_host)
        self.tracker.observe(params_host, validation_accuracy=out.get("validation_accuracy"),
                             test_accuracy=out["test_accuracy"], test_loss=out["test_loss"], **extra)
        if self.validation is not None:
            out["best_validation_accuracy"] = self.tracker.best["validation_accuracy"]
        self.last = out
        return out

    @property
    def deciding_accuracy(self):
        """The accuracy a target and early stopping compare: validation when held out, else test."""
        return self.last.get("validation_accuracy", self.last.get("test_accuracy"))

    @property
    def should_stop(self) -> bool:
        return self.tracker.should_stop

    def finish(self, summary: dict, last_params) -> dict:
        """Fill ``summary`` with the model choice: ``params`` the selected model, ``last_params`` the last one when
        the best differs, test figures of the selected model, and the tracker's fields; return it."""
        chosen = self.tracker.selected
        summary.update(self.tracker.summary())
        summary["params"] = self.tracker.selected_params(last_params)
        if chosen == "best":
            summary["last_params"] = last_params
            summary["test_accuracy"] = self.tracker.best["test_accuracy"]
            summary["test_loss"] = self.tracker.best.get("test_loss", summary.get("test_loss"))
            summary["last_test_loss"] = self.last.get("test_loss")
        summary["validation_rows"] = self.n_validation
        return summary


def options_as_trained(cfg) -> dict:
    """The summary's record of the options after ``sgd_defaults`` filled them (the config keeps only those given)."""
    return {"batch_size": int(cfg.batch_size), "peak_lr": float(cfg.lr), "momentum": float(cfg.momentum)}


def schedule_budget(cfg, stop, *, n_train: int, workers: int = 1):
    """Return ``(schedule, budget)``: ``cfg.lr_schedule`` at peak ``cfg.lr`` and the run's length in global samples
    of the ``n_train`` training rows (after the holdout, as StopRule counts) and/or seconds; budget None for a
    constant schedule (nothing to measure)."""
    schedule = cfg.lr_schedule.with_lr(cfg.lr)
    if schedule.is_constant:
        return schedule, None
    budget = RunBudget.from_limits(n_train=n_train, batch_size=cfg.batch_size, workers=workers, epochs=stop.epochs,
                                   steps=stop.steps, time_limit=stop.time_limit)
    return schedule, budget
