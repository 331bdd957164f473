"""``python -m asyncsgd.evaluate``: a saved model's test figures equal the trainer's; bad input is one line, exit 2."""
import csv
import json
import os
import re
import subprocess
import sys

from asyncsgd.model import build_model, save_model
from paths import REPO


def _run(module, args, cwd, timeout=120):
    env = {**os.environ, "PYTHONPATH": REPO + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=cwd)


def _figures(stdout):
    loss = float(re.search(r"^test loss: (\S+)$", stdout, re.M).group(1))
    m = re.search(r"^test accuracy: (\S+) \((\d+)/(\d+) correct\)$", stdout, re.M)
    return loss, float(m.group(1)), int(m.group(2)), int(m.group(3))


def _one_error(proc, needle):
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [ln for ln in (proc.stdout + proc.stderr).splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("asyncsgd: error:"), lines
    assert needle in lines[0], lines[0]


def test_evaluate_reproduces_the_trainers_final_figures(tmp_path):
    proc = _run("asyncsgd.train", ["--mode", "serial", "--data", "synthetic:300", "--steps", "20", "--progress",
                                   "none", "--model-out", "m.h5", "--summary-json", "s.json"], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    summary = json.loads((tmp_path / "s.json").read_text())
    proc = _run("asyncsgd.evaluate", ["m.h5", "--predictions", "p.csv"], tmp_path)   # data from the model's config
    assert proc.returncode == 0, proc.stdout + proc.stderr
    loss, acc, correct, n = _figures(proc.stdout)
    assert correct / n == summary["test_accuracy"]                   # exactly the trainer's accuracy
    assert f"{summary['test_accuracy']:.4f}" in proc.stdout
    assert loss == float(f"{summary['test_loss']:.6f}")
    rows = list(csv.DictReader((tmp_path / "p.csv").open()))
    assert len(rows) == n == 60 and list(rows[0]) == ["index", "label", "predicted", "probability"]
    assert sum(r["label"] == r["predicted"] for r in rows) == correct
    assert all(0.0 < float(r["probability"]) <= 1.0 for r in rows)


USER_MODULE = '''
from asyncsgd.model import AvgPool2D, Conv2D, Dense, Flatten, MaxPool2D, Network, Tanh

def band_cnn(input_shape, n_classes, *, ops, seed=0):
    layers = [Conv2D(4, (5, 3), pad=(2, 1)), MaxPool2D((4, 1)), Tanh(), AvgPool2D((1, 4)), Flatten(),
              Dense(n_classes)]
    return Network("band_cnn", layers, input_shape, n_classes, ops=ops, seed=seed)
'''


def test_evaluate_a_user_network_without_its_code(tmp_path, monkeypatch):
    code = tmp_path / "code"
    code.mkdir()
    (code / "band_nets_eval.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(code))
    net = build_model("band_nets_eval:band_cnn", (1, 40, 64), 10, seed=1)
    save_model(tmp_path / "u.h5", net, {"config": {"data": "synthetic:50"}})
    proc = _run("asyncsgd.evaluate", ["u.h5", "--batch-size", "7"], tmp_path)      # cwd without band_nets_eval.py
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from asyncsgd.data import open_source
    x, y = open_source("synthetic:50").test_set()
    want_loss, want_acc = net.evaluate(x, y, batch_size=7)
    loss, acc, correct, n = _figures(proc.stdout)
    assert n == len(y) and correct / n == want_acc and loss == float(f"{want_loss:.6f}")
    assert "band_nets_eval:band_cnn" in proc.stdout


def test_evaluate_bad_input_is_one_error_line(tmp_path):
    (tmp_path / "junk.h5").write_bytes(b"not a model" * 20)
    small = build_model("logreg", (1, 8, 8), 10)
    save_model(tmp_path / "small.h5", small)                           # records no data set
    good = build_model("logreg", (1, 40, 64), 10)
    save_model(tmp_path / "good.h5", good, {"config": {"data": "synthetic:50"}})
    cases = [
        (["missing.h5"], "model file missing.h5 does not exist"),
        (["junk.h5"], "unreadable or incomplete"),
        (["small.h5"], "does not record its data set; give --data"),
        (["small.h5", "--data", "synthetic:50"], "holds 1x40x64 inputs but the model takes 1x8x8"),
        (["good.h5", "--data", "nothing.h5"], "nothing.h5"),
        (["good.h5", "--batch-size", "0"], "--batch-size must be >= 1"),
        (["good.h5", "--predictions", "no/such/dir/p.csv"], "does not exist"),
        ([], "required: model"),
    ]
    for args, needle in cases:
        _one_error(_run("asyncsgd.evaluate", args, tmp_path), needle)
    assert not list(tmp_path.glob("**/*.csv"))
