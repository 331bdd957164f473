"""The progress display of rank 0: one live line on a terminal, one plain line per record elsewhere.

A record is a dict of whatever the trainer measured (see ``asyncsgd.io.metrics``); the line shows the keys that are
present: elapsed time, samples, samples/s, loss, test accuracy, mean staleness, and an ETA when the run's length is
known (the record's ``fraction_done``, or ``total``: samples, steps or seconds).
"""
from __future__ import annotations

import math
import sys

__all__ = ["ProgressLine", "format_record", "format_duration", "fraction_done", "PROGRESS_MODES"]

PROGRESS_MODES = ("auto", "bar", "lines", "none")

# Which record key measures progress towards each kind of total.
_TOTAL_KEYS = {"samples": ("samples",), "steps": ("steps", "iteration"), "time": ("time",)}


def format_duration(seconds: float) -> str:
    """Format seconds as M:SS or H:MM:SS."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?"
    s = int(round(seconds))
    h, rem = divmod(s, 3600)
    m, s = divmod(rem, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def _normalise_total(total) -> dict:
    """Accept None, a number (samples) or a dict with 'samples', 'steps' and/or 'time'; return the dict."""
    if total is None:
        return {}
    if isinstance(total, (int, float)):
        total = {"samples": total}
    if not isinstance(total, dict):
        raise ValueError(f"total must be None, a number of samples or a dict of samples/steps/time, got {total!r}")
    unknown = set(total) - set(_TOTAL_KEYS)
    if unknown:
        raise ValueError(f"total: unknown key(s) {sorted(unknown)}; use samples, steps or time")
    return {k: float(v) for k, v in total.items() if v is not None and float(v) > 0}


def fraction_done(record: dict, total: dict) -> float | None:
    """Return the fraction of the run done (0-1): the record's own 'fraction_done' when the trainer reports one,
    else the largest over the known totals (the first limit reached ends the run); None when nothing applies."""
    own = record.get("fraction_done")
    if isinstance(own, (int, float)) and 0 <= own <= 1:
        return float(own)
    fractions = []
    for kind, limit in total.items():
        for key in _TOTAL_KEYS[kind]:
            value = record.get(key)
            if isinstance(value, (int, float)):
                fractions.append(min(1.0, value / limit))
                break
    return max(fractions) if fractions else None


def _number(value) -> str:
    """Format a count compactly: 12345 -> 12.3k."""
    value = float(value)
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.1f}{unit}"
    return f"{value:.0f}"


def format_record(record: dict, total: dict | None = None) -> str:
    """Return the one-line summary of a record (only the keys present are shown)."""
    total = total or {}
    parts = []
    t = record.get("time")
    if isinstance(t, (int, float)):
        parts.append(f"[{format_duration(t)}]")
    if "iteration" in record:
        parts.append(f"it {record['iteration']}")
    if "samples" in record:
        parts.append(f"samples {_number(record['samples'])}")
    if isinstance(record.get("samples_per_s"), (int, float)):
        parts.append(f"{_number(record['samples_per_s'])}/s")
    if isinstance(record.get("loss"), (int, float)):
        parts.append(f"loss {record['loss']:.4f}")
    if isinstance(record.get("test_accuracy"), (int, float)):
        parts.append(f"acc {record['test_accuracy']:.4f}")
    if isinstance(record.get("staleness_mean"), (int, float)):
        parts.append(f"stale {record['staleness_mean']:.1f}")
    done = fraction_done(record, total)
    if done is not None and isinstance(t, (int, float)):
        eta = t * (1 - done) / done if done > 0 else float("nan")
        parts.append(f"{100 * done:.0f}% ETA {format_duration(eta)}")
    return "  ".join(parts)


class ProgressLine:
    """Show training progress on ``stream``.

    mode: 'bar' rewrites one line in place with '\\r' (for terminals), 'lines' prints one line per record, 'none'
    prints nothing, 'auto' picks 'bar' when ``stream.isatty()`` and 'lines' otherwise (a SLURM output file, a pipe).
    total: None, a number of samples, or a dict with any of 'samples', 'steps', 'time' (seconds) for the ETA.
    """

    def __init__(self, stream=None, mode: str = "auto", total=None):
        if mode not in PROGRESS_MODES:
            raise ValueError(f"progress mode must be one of {', '.join(PROGRESS_MODES)}, got {mode!r}")
        self.stream = sys.stdout if stream is None else stream
        if mode == "auto":
            isatty = getattr(self.stream, "isatty", None)
            mode = "bar" if isatty is not None and isatty() else "lines"
        self.mode = mode
        self.total = _normalise_total(total)
        self._line = ""      # the live line currently shown (bar mode)
        self._shown = 0      # its width on screen, to blank leftovers when a shorter line replaces it

    def update(self, record: dict) -> None:
        """Show ``record``: redraw the live line, or print one line."""
        if self.mode == "none":
            return
        text = format_record(record, self.total)
        if self.mode == "bar":
            self._line = text
            self._draw()
        else:
            self.stream.write(text + "\n")
            self.stream.flush()

    def message(self, text: str) -> None:
        """Print a plain line above the live line, which is redrawn below it."""
        if self.mode == "none":
            return
        if self.mode == "bar" and self._shown:
            self.stream.write("\r" + " " * self._shown + "\r")
            self._shown = 0
        self.stream.write(text + "\n")
        if self.mode == "bar" and self._line:
            self._draw()
        self.stream.flush()

    def close(self) -> None:
        """End the live line so later output starts on a fresh line."""
        if self.mode == "bar" and self._shown:
            self.stream.write("\n")
            self.stream.flush()
        self._shown = 0
        self._line = ""

    def _draw(self) -> None:
        pad = max(0, self._shown - len(self._line))
        self.stream.write("\r" + self._line + " " * pad)
        self.stream.flush()
        self._shown = len(self._line)
