"""Tests of asyncsgd.algorithms.best_model: the kept model, which one is selected, early stopping."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest

from asyncsgd.algorithms.best_model import BestModelTracker
from asyncsgd.data import open_source
from asyncsgd.data.holdout import read_rows, read_train_labels, split_holdout
from asyncsgd.model import build_model
from paths import REPO, repo_env


def _params(value, n=8):
    return np.full(n, value, dtype=np.float32)


def test_ties_keep_the_later_model_by_default():
    t = BestModelTracker()
    p = _params(0)
    for i, acc in enumerate([0.5, 0.7, 0.6, 0.7, 0.65]):
        p[...] = i
        assert t.observe(p, validation_accuracy=acc, test_accuracy=acc) == (i in (0, 1, 3))
    assert np.array_equal(t.best_params, _params(3)) and t.best["evaluation"] == 3
    assert t.since_best == 3, "patience counts from the last strict improvement (evaluation 1)"


def test_copies_on_improvement_and_ties_keep_the_earlier():
    t = BestModelTracker(prefer_later=False)
    p = _params(0)
    for i, acc in enumerate([0.5, 0.7, 0.7, 0.6]):
        p[...] = i                                    # the trainer keeps changing the same vector
        improved = t.observe(p, validation_accuracy=acc, test_accuracy=acc - 0.01, time=float(i), steps=10 * i)
        assert improved == (i in (0, 1))
    assert np.array_equal(t.best_params, _params(1)), "the tie at evaluation 2 must keep evaluation 1's copy"
    assert t.best_params is not p
    s = t.summary()
    assert s["selected_model"] == "best"
    assert s["best_validation_accuracy"] == 0.7 and s["best_time"] == 1.0 and s["best_steps"] == 10
    assert s["best_test_accuracy"] == pytest.approx(0.69)
    assert s["selected_test_accuracy"] == pytest.approx(0.69)
    assert s["last_validation_accuracy"] == 0.6 and s["last_test_accuracy"] == pytest.approx(0.59)
    assert s["evaluations"] == 4 and s["evaluations_since_best"] == 2 and not s["early_stopped"]
    json.dumps(s)                                     # goes into the summary JSON as is
    assert np.array_equal(t.selected_params(p), _params(1))


def test_last_is_selected_when_the_final_evaluation_is_the_best():
    t = BestModelTracker()
    for i, acc in enumerate([0.5, 0.6, 0.9]):
        t.observe(_params(i), validation_accuracy=acc, time=float(i))
    assert t.summary()["selected_model"] == "last"
    last = _params(2)
    assert t.selected_params(last) is last
    assert np.array_equal(t.best_params, last)


def test_min_delta_ignores_small_gains():
    t = BestModelTracker(min_delta=0.01)
    t.observe(_params(0), validation_accuracy=0.90)
    assert not t.observe(_params(1), validation_accuracy=0.905)
    assert t.observe(_params(2), validation_accuracy=0.92)
    assert np.array_equal(t.best_params, _params(2))


def test_patience_stops_after_that_many_evaluations_without_improvement():
    t = BestModelTracker(patience=2)
    stops = []
    for acc in [0.5, 0.6, 0.55, 0.6, 0.58]:
        t.observe(_params(acc), validation_accuracy=acc)
        stops.append(t.should_stop)
    assert stops == [False, False, False, True, True]
    assert t.summary()["early_stopped"] is True
    again = BestModelTracker(patience=2)
    for acc in [0.5, 0.4, 0.6, 0.5]:                  # an improvement resets the count
        again.observe(_params(acc), validation_accuracy=acc)
    assert not again.should_stop and again.since_best == 1


def test_without_validation_nothing_is_kept_and_the_last_model_is_selected():
    t = BestModelTracker(patience=1)
    for i in range(3):
        assert not t.observe(_params(i), validation_accuracy=None, test_accuracy=0.9)
    s = t.summary()
    assert s["selected_model"] == "last" and s["best_validation_accuracy"] is None
    assert s["last_test_accuracy"] == 0.9 and not t.should_stop and t.best_params is None


def test_the_copy_keeps_the_dtype():
    t = BestModelTracker()
    t.observe(np.arange(4, dtype=np.float64), validation_accuracy=0.5)
    assert t.best_params.dtype == np.float64


def test_the_best_is_selected_over_the_last_only_beyond_the_margin():
    """On 270 validation rows with margin 2 (standard errors of the difference): a mid-run best 3 rows above the
    last (the winner's curse seen on FSDD) is kept but not selected; a collapse of 10 rows selects the best."""
    n = 270
    t = BestModelTracker(selection_margin=2.0, n_validation=n)
    for i, rows in enumerate([200, 267, 262, 264]):   # best at evaluation 1 (0.989), last 0.978
        t.observe(_params(i), validation_accuracy=rows / n, test_accuracy=0.9)
    p = (267 + 264) / 2 / n
    assert t.margin() == pytest.approx(2 * math.sqrt(2 * p * (1 - p) / n))     # 0.019: 5.2 rows
    assert t.selected == "last" and t.best["evaluation"] == 1, "the best is kept, not selected"
    assert np.array_equal(t.best_params, _params(1))
    last = _params(3)
    assert t.selected_params(last) is last
    s = t.summary()
    assert s["selected_model"] == "last" and s["selected_validation_accuracy"] == 264 / n
    assert s["best_validation_accuracy"] == 267 / n and s["selection_margin_accuracy"] == pytest.approx(t.margin())
    t.observe(_params(4), validation_accuracy=257 / n)    # the run collapses by 10 rows: the best is selected
    assert t.selected == "best" and np.array_equal(t.selected_params(_params(4)), _params(1))
    # margin 0 (or no row count): the best whenever strictly better, the rule before the margin
    for kwargs in (dict(selection_margin=0.0, n_validation=n), dict(selection_margin=2.0)):
        u = BestModelTracker(**kwargs)
        for i, rows in enumerate([267, 264]):
            u.observe(_params(i), validation_accuracy=rows / n)
        assert u.selected == "best" and u.margin() == 0.0


@pytest.mark.parametrize("kwargs,match", [(dict(patience=0), "patience must be a positive number"),
                                          (dict(patience=1.5), "patience must be"),
                                          (dict(min_delta=-0.1), "min_delta must be in"),
                                          (dict(selection_margin=-1), "selection_margin must be"),
                                          (dict(selection_margin=float("nan")), "selection_margin must be"),
                                          (dict(n_validation=-3), "n_validation must be")])
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        BestModelTracker(**kwargs)


def test_bad_accuracy_is_refused():
    t = BestModelTracker()
    with pytest.raises(ValueError, match="validation_accuracy must be a fraction in \\[0, 1\\]"):
        t.observe(_params(0), validation_accuracy=1.5)
    with pytest.raises(ValueError, match="test_accuracy must be"):
        t.observe(_params(0), validation_accuracy=0.5, test_accuracy=float("nan"))


def test_kept_model_reevaluates_to_the_best_logged_validation_accuracy():
    """Train a logistic regression on 90% of generated data for a few steps, evaluating on the held-out 10% after
    each; the kept parameters, evaluated again, give exactly the best accuracy the log recorded."""
    src = open_source("synthetic:200")
    train, val = split_holdout(read_train_labels(src), 0.1, seed=0)
    x, y = read_rows(src, train)
    xv, yv = read_rows(src, val)
    net = build_model("logreg", src.input_shape, src.n_classes, seed=0)
    rng = np.random.default_rng(0)
    tracker = BestModelTracker()
    log = []
    for step in range(12):
        batch = rng.choice(len(y), 16, replace=False)
        net.loss_and_grad(x[batch], y[batch])
        net.params -= 0.5 * net.grads
        _, acc = net.evaluate(xv, yv)
        log.append({"steps": step + 1, "validation_accuracy": float(acc)})
        tracker.observe(net.params, validation_accuracy=float(acc), steps=step + 1)
    best_logged = max(r["validation_accuracy"] for r in log)
    assert tracker.summary()["selected_model"] == "best", "this seed's accuracy falls after its peak (0.75)"
    assert tracker.summary()["best_validation_accuracy"] == best_logged
    first_best = next(r["steps"] for r in log if r["validation_accuracy"] == best_logged)
    assert tracker.summary()["best_steps"] == first_best
    net.params[...] = tracker.best_params            # the copy, not the live vector
    assert net.evaluate(xv, yv)[1] == best_logged


def test_cli_selects_by_the_margin_and_reports_it(tmp_path):
    """Through the CLI: an oscillating constant-rate run (the same as test_train_cli's) under the default margin
    reports the margin, and selects the best exactly when its logged validation accuracy beats the last one's by
    more than it; the model file is the selected one; --selection-margin -1 is one usage error."""
    import subprocess
    import sys
    env = repo_env()
    run = tmp_path / "run"
    base = [sys.executable, "-m", "asyncsgd.train", "--mode", "serial", "--model", "logreg", "--data",
            "synthetic:400", "--epochs", "12", "--lr", "0.5", "--lr-schedule", "constant", "--seed", "4",
            "--progress", "none"]
    proc = subprocess.run(base + ["--run-dir", str(run)], capture_output=True, text=True, timeout=240, env=env,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    s = json.loads((run / "summary.json").read_text())
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    best, last = max(r["validation_accuracy"] for r in recs), recs[-1]["validation_accuracy"]
    p = (best + last) / 2
    margin = 2 * math.sqrt(2 * p * (1 - p) / s["validation_rows"])
    assert s["selection_margin_accuracy"] == pytest.approx(margin)
    assert s["best_validation_accuracy"] == best and s["last_validation_accuracy"] == last
    assert best > last, "this seed's best is not its last evaluation"
    assert s["selected_model"] == ("best" if best - last > margin else "last")
    chosen = best if s["selected_model"] == "best" else last
    assert s["selected_validation_accuracy"] == chosen
    from asyncsgd.algorithms.common import TrainingSplit
    from asyncsgd.model.files import read_model
    src = open_source("synthetic:400")
    params, _ = read_model(str(run / "model.h5"))
    net = build_model("logreg", src.input_shape, src.n_classes, seed=0)
    net.params[...] = params
    x, y = TrainingSplit(src, 0.1, 4).validation_set()
    assert float(net.evaluate(x, y)[1]) == pytest.approx(chosen, abs=1e-9)
    bad = subprocess.run(base + ["--run-dir", "none", "--selection-margin", "-1"], capture_output=True, text=True,
                         timeout=120, env=env, cwd=REPO)
    assert bad.returncode == 2 and bad.stderr.count("asyncsgd: error:") == 1 and "--selection-margin" in bad.stderr
