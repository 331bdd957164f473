"""The best model so far by validation accuracy, kept beside the last one, and early stopping (rank 0).

A run with a validation split (``--validation F``) chooses its model without looking at the test set: after each
evaluation rank 0 calls ``tracker.observe(params, validation_accuracy=..., test_accuracy=..., time=..., ...)``; the
tracker copies the parameters when the validation accuracy beats every earlier one by more than ``min_delta``, or
equals the best (a tie): the later of two equally accurate models is kept, because with a decaying learning rate it
has trained longer at a lower rate (with 270 validation rows one row is 0.0037, so ties at the top are frequent; on
the Downpour default, seeds 10-12, keeping the earlier one selected mid-run models 0.006-0.014 below the last one on
the test set).  ``prefer_later=False`` keeps the earlier one.  ``--patience`` counts evaluations since the last
strict improvement (a tie moves the copy but does not reset the count).  The test accuracy passed in is only stored,
to be reported beside the choice.

Which model is selected.  The best-validation model is always kept, but it is *selected* only when its validation
accuracy beats the last model's by more than ``selection_margin`` standard errors of the difference of two
accuracies measured on ``n_validation`` rows, ``sqrt(2 p (1 - p) / n)`` with ``p`` their mean (default 2: on 270
rows at p = 0.985 the margin is 0.021, 5.6 rows); otherwise the last model is selected.  Why: the best of a run's
15-50 evaluations on a few hundred rows is a maximum over noise (a winner's curse), and with a schedule that decays
to 0 the last model has trained longest at the lowest rate.  On the FSDD defaults the best-validation model was a
mid-run one 0.003-0.017 below the last on the test set (sync seed 10 at 45% of the run; Downpour seed 1 and sync
seed 0 of the first acceptance runs; docs/SCHEDULES.md section 8); a real collapse late in a run (a constant rate
that oscillates, a divergence) costs many rows and still selects the best.  ``selection_margin=0`` (or no
``n_validation``) selects the best whenever it is strictly better than the last.

At the end ``tracker.summary()`` says which model was selected, ``"last"`` or ``"best"``, gives both models' figures
and the margin applied (``selection_margin_accuracy``).  Without a validation split (``validation_accuracy=None``)
nothing is copied and the last model is selected.
"""
from __future__ import annotations

import math
import numbers

import numpy

__all__ = ["BestModelTracker"]


def _accuracy(name: str, value):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= float(value) <= 1:
        raise ValueError(f"{name} must be a fraction in [0, 1] or None, got {value!r}")
    return float(value)


class BestModelTracker:
    """Keep a copy of the parameters with the best validation accuracy; decide early stopping.

    ``patience``: stop after this many evaluations in a row that neither improve on nor equal the best (None:
    never); ``min_delta``: the improvement that counts (default 0: any strict increase); ``prefer_later``: a tie
    replaces the kept copy (default) or not; ``selection_margin`` (standard errors, >= 0) and ``n_validation`` (rows)
    decide when the kept best is selected over the last model (module docstring).  Parameters are host (numpy)
    vectors; the copy keeps their dtype and goes into one buffer allocated at the first improvement.
    """

    def __init__(self, *, patience: int | None = None, min_delta: float = 0.0, prefer_later: bool = True,
                 selection_margin: float = 0.0, n_validation: int | None = None):
        if patience is not None and (isinstance(patience, bool) or not isinstance(patience, numbers.Integral)
                                     or patience < 1):
            raise ValueError(f"patience must be a positive number of evaluations or None, got {patience!r}")
        if isinstance(min_delta, bool) or not isinstance(min_delta, numbers.Real) or not 0 <= min_delta < 1:
            raise ValueError(f"min_delta must be in [0, 1), got {min_delta!r}")
        if (isinstance(selection_margin, bool) or not isinstance(selection_margin, numbers.Real)
                or not math.isfinite(selection_margin) or selection_margin < 0):
            raise ValueError(f"selection_margin must be a number of standard errors >= 0, got {selection_margin!r}")
        if n_validation is not None and (isinstance(n_validation, bool)
                                         or not isinstance(n_validation, numbers.Integral) or n_validation < 0):
            raise ValueError(f"n_validation must be a number of rows >= 0 or None, got {n_validation!r}")
        self.selection_margin = float(selection_margin)
        self.n_validation = None if n_validation is None else int(n_validation)
        self.patience = None if patience is None else int(patience)
        self.min_delta = float(min_delta)
        self.prefer_later = bool(prefer_later)
        self.best_params = None          # numpy copy of the best parameters (None until a validated evaluation)
        self.best = None                 # the record of the best evaluation (dict), or None
        self.last = None                 # the record of the latest evaluation
        self.evaluations = 0
        self.since_best = 0              # evaluations after the best one

    def observe(self, params, *, validation_accuracy=None, test_accuracy=None, time: float | None = None,
                **extra) -> bool:
        """Record one evaluation of ``params``; copy them if they are the best so far; return whether they were.

        ``extra`` (e.g. ``samples=``, ``steps=``, ``validation_loss=``) is stored with the evaluation's record.
        """
        val = _accuracy("validation_accuracy", validation_accuracy)
        record = {"validation_accuracy": val, "test_accuracy": _accuracy("test_accuracy", test_accuracy),
                  "time": None if time is None else float(time), "evaluation": self.evaluations, **extra}
        self.evaluations += 1
        self.last = record
        if val is None:
            return False
        best = None if self.best is None else self.best["validation_accuracy"]
        tie = best is not None and self.prefer_later and val == best
        if tie:   # keep the later model; patience still counts from the last strict improvement
            self._keep(params, record)
            self.since_best += 1
            return True
        if best is None or val > best + self.min_delta:
            self._keep(params, record)
            self.since_best = 0
            return True
        self.since_best += 1
        return False

    def _keep(self, params, record):
        src = numpy.asarray(params)
        if self.best_params is None or self.best_params.shape != src.shape or self.best_params.dtype != src.dtype:
            self.best_params = numpy.empty_like(src)
        self.best_params[...] = src
        self.best = record

    @property
    def should_stop(self) -> bool:
        """True once ``patience`` evaluations in a row brought no improvement (early stopping)."""
        return self.patience is not None and self.best is not None and self.since_best >= self.patience

    def margin(self) -> float:
        """The validation-accuracy gain over the last model that selects the kept best (0 without a margin)."""
        if not self.selection_margin or not self.n_validation or self.best is None or self.last is None:
            return 0.0
        p = (self.best["validation_accuracy"] + self.last["validation_accuracy"]) / 2
        return self.selection_margin * math.sqrt(2 * p * (1 - p) / self.n_validation)

    @property
    def selected(self) -> str:
        """'best' when the kept copy differs from the last evaluated parameters and beats them on validation by more
        than ``margin()``, else 'last'."""
        if self.best is None or self.best is self.last:
            return "last"
        gain = self.best["validation_accuracy"] - self.last["validation_accuracy"]
        return "best" if gain > self.margin() else "last"

    def selected_params(self, last_params):
        """Return the parameters of the selected model: the kept copy, or ``last_params`` when 'last' is selected."""
        return self.best_params if self.selected == "best" else last_params

    def summary(self) -> dict:
        """Return the summary's model-choice fields (JSON-ready; None where not measured)."""
        best, last = self.best or {}, self.last or {}
        chosen = best if self.selected == "best" else last
        return {
            "selected_model": self.selected,
            "selected_validation_accuracy": chosen.get("validation_accuracy"),
            "selected_test_accuracy": chosen.get("test_accuracy"),
            "best_validation_accuracy": best.get("validation_accuracy"),
            "best_test_accuracy": best.get("test_accuracy"),
            "best_time": best.get("time"),
            "best_evaluation": best.get("evaluation"),
            "last_validation_accuracy": last.get("validation_accuracy"),
            "last_test_accuracy": last.get("test_accuracy"),
            "evaluations": self.evaluations,
            "evaluations_since_best": self.since_best if self.best is not None else None,
            "early_stopped": self.should_stop,
            "selection_margin_accuracy": self.margin() if self.best is not None else None,
            # what the trainer passed with the best evaluation (samples, steps, ...), prefixed
            **{f"best_{k}": v for k, v in best.items()
               if k not in ("validation_accuracy", "test_accuracy", "time", "evaluation")},
        }

    def __repr__(self):
        b = None if self.best is None else self.best["validation_accuracy"]
        return (f"BestModelTracker(best_validation_accuracy={b}, evaluations={self.evaluations}, "
                f"since_best={self.since_best}, patience={self.patience})")
