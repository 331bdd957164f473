"""Turn JSONL metrics logs into a PNG of curves: python -m asyncsgd.plot LOG [LOG...] -o FILE.png

Panels: test accuracy and loss against time and against samples, per-worker throughput against time, and the
staleness histogram.  Several logs are overlaid, one colour per run, labelled by file name.  Needs matplotlib
(``pip install 'asyncsgd[plot]'``).
"""
from __future__ import annotations

import argparse
import os
import sys

from asyncsgd.io.metrics import read_log

__all__ = ["main", "plot_runs", "staleness_counts"]


def _series(records, xkey, ykey):
    """Return (xs, ys) of the records holding numbers under both keys."""
    pts = [(r[xkey], r[ykey]) for r in records
           if isinstance(r.get(xkey), (int, float)) and isinstance(r.get(ykey), (int, float))]
    return [p[0] for p in pts], [p[1] for p in pts]


def staleness_counts(records) -> list:
    """Return the run's staleness histogram (counts for tau = 0, 1, ...).

    Trainers may report counts since the start (each histogram contains the previous one: take the last) or since
    the previous record (sum them); both read right here.
    """
    hists = [r["staleness_hist"] for r in records if isinstance(r.get("staleness_hist"), list) and r["staleness_hist"]]
    if not hists:
        return []
    cumulative = all(len(b) >= len(a) and all(y >= x for x, y in zip(a, b)) for a, b in zip(hists, hists[1:]))
    if cumulative:
        return list(hists[-1])
    total = [0] * max(len(h) for h in hists)
    for h in hists:
        for i, c in enumerate(h):
            total[i] += c
    return total


def plot_runs(runs: dict, out_path: str) -> None:
    """Draw every run (label -> list of records) into one PNG at ``out_path``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(16, 9), constrained_layout=True)
    (acc_t, acc_s, thr), (loss_t, loss_s, stale) = axes
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    drawn = {ax: False for ax in axes.flat}

    def line(ax, xs, ys, **kw):
        if xs:
            ax.plot(xs, ys, **kw)
            drawn[ax] = True

    for i, (label, records) in enumerate(runs.items()):
        c = colours[i % len(colours)]
        line(acc_t, *_series(records, "time", "test_accuracy"), color=c, marker=".", label=label)
        line(acc_s, *_series(records, "samples", "test_accuracy"), color=c, marker=".", label=label)
        line(loss_t, *_series(records, "time", "loss"), color=c, label=f"{label} (train)")
        line(loss_s, *_series(records, "samples", "loss"), color=c, label=f"{label} (train)")
        line(loss_t, *_series(records, "time", "test_loss"), color=c, linestyle="--", label=f"{label} (test)")
        line(loss_s, *_series(records, "samples", "test_loss"), color=c, linestyle="--", label=f"{label} (test)")
        per_worker = [(r["time"], r["per_worker_samples_per_s"]) for r in records
                      if isinstance(r.get("time"), (int, float))
                      and isinstance(r.get("per_worker_samples_per_s"), list)]
        n_workers = max((len(v) for _, v in per_worker), default=0)
        for w in range(n_workers):
            pts = [(t, v[w]) for t, v in per_worker if w < len(v) and isinstance(v[w], (int, float))]
            line(thr, [p[0] for p in pts], [p[1] for p in pts], color=c, alpha=0.8, linewidth=1,
                 label=label if w == 0 else None)
        if not n_workers:
            line(thr, *_series(records, "time", "samples_per_s"), color=c, label=f"{label} (total)")
        counts = staleness_counts(records)
        if counts and sum(counts):
            total = sum(counts)
            width = 0.8 / len(runs)  # runs side by side within each tau
            stale.bar([tau - 0.4 + (i + 0.5) * width for tau in range(len(counts))], [k / total for k in counts],
                      width=width, color=c, label=label)
            stale.xaxis.get_major_locator().set_params(integer=True)
            drawn[stale] = True

    titles = {acc_t: ("test accuracy", "time (s)", "accuracy"), acc_s: ("test accuracy", "samples", "accuracy"),
              loss_t: ("loss", "time (s)", "loss"), loss_s: ("loss", "samples", "loss"),
              thr: ("throughput per worker", "time (s)", "samples/s"),
              stale: ("staleness of pushes", "staleness tau (pushes since fetch)", "fraction of pushes")}
    for ax, (title, xlabel, ylabel) in titles.items():
        ax.set_title(title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if drawn[ax]:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data in these logs", ha="center", va="center", transform=ax.transAxes)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m asyncsgd.plot",
                                description="Plot JSONL metrics logs (written by python -m asyncsgd.train --log) "
                                            "into one PNG; several logs are overlaid.")
    p.add_argument("logs", nargs="+", metavar="LOG", help="JSONL metrics log(s)")
    p.add_argument("-o", "--output", required=True, metavar="FILE.png", help="the PNG to write")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    runs = {}
    try:
        for path in args.logs:
            label = os.path.basename(path)
            while label in runs:  # same file name in two folders: keep both
                label += "'"
            runs[label] = read_log(path)
    except (OSError, ValueError) as exc:
        parser.exit(2, f"asyncsgd.plot: error: {exc}\n")
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        parser.exit(2, f"asyncsgd.plot: error: output folder {folder} does not exist\n")
    try:  # checked after the logs, so a bad log is reported as such wherever matplotlib is missing
        import matplotlib  # noqa: F401
    except ImportError:
        parser.exit(2, "asyncsgd.plot: error: matplotlib is not installed: pip install 'asyncsgd[plot]'\n")
    plot_runs(runs, args.output)
    print(f"wrote {args.output} ({len(runs)} run{'s' if len(runs) != 1 else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
