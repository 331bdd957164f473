"""The metrics log of rank 0: one JSON object per line (JSONL), plus the progress display.

Records hold whatever the trainer measured; common keys are ``time`` (seconds since start), ``samples``, ``loss``,
``test_accuracy``, ``samples_per_s``, ``per_worker_samples_per_s`` (list), ``staleness_mean``, ``staleness_hist``
(list of counts for tau = 0, 1, ...), ``push_density``, ``bytes_moved`` and ``iteration``.  ``asyncsgd.plot``
reads the log back.
"""
from __future__ import annotations

import json
import math
import sys
import time

from asyncsgd.io.atomic import atomic_path
from asyncsgd.io.progress_line import ProgressLine

__all__ = ["Reporter", "write_json_atomic", "to_jsonable", "read_log"]


def to_jsonable(obj):
    """Convert numpy scalars and arrays (and tuples) inside ``obj`` to plain Python for json."""
    if isinstance(obj, dict):
        return {str(k): to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_jsonable(v) for v in obj]
    if hasattr(obj, "tolist"):  # numpy/cupy arrays and scalars
        return to_jsonable(obj.tolist())
    if isinstance(obj, float) and not math.isfinite(obj):
        return None  # strict JSON has no NaN/inf; a missing value reads back as null
    return obj


def write_json_atomic(path, obj) -> None:
    """Write ``obj`` as indented JSON to ``path`` atomically (temporary file in the same folder, fsync, rename)."""
    text = json.dumps(to_jsonable(obj), indent=2, sort_keys=True) + "\n"
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def read_log(path) -> list[dict]:
    """Read a JSONL metrics log; raise ValueError naming the file and line if it is empty or not JSONL."""
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{lineno}: not a JSON line ({exc.msg}); "
                                 f"is this a metrics log written with --log?") from None
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object per line, got {type(rec).__name__}")
            records.append(rec)
    if not records:
        raise ValueError(f"{path}: the metrics log holds no records")
    return records


class Reporter:
    """Record training metrics on rank 0: a JSONL log line per record and the progress display.

    log_path: the JSONL file (None: no log); truncated unless ``append`` (a resumed run continues its log).
    progress: 'auto', 'bar', 'lines' or 'none' (see ProgressLine); stream: where the display goes.
    total: what ends the run, for the ETA: None, a number of samples, or a dict of samples/steps/time.
    A record without 'time' gets the seconds since the Reporter was made.
    """

    def __init__(self, log_path=None, progress: str = "auto", stream=None, total=None, *, append: bool = False):
        self.start = time.monotonic()
        self.progress = ProgressLine(sys.stdout if stream is None else stream, progress, total)
        self.log_path = log_path
        self._log = open(log_path, "a" if append else "w", encoding="utf-8") if log_path else None
        self.records = 0

    def record(self, rec: dict) -> dict:
        """Append ``rec`` to the log (flushed, so a killed run keeps its curve) and update the display."""
        rec = self.event(rec)
        self.progress.update(rec)
        self.records += 1
        return rec

    def event(self, rec: dict) -> dict:
        """Append an event record (``{"event": ...}``, e.g. a lost worker) to the log only; no display update."""
        rec = to_jsonable(rec)
        rec.setdefault("time", time.monotonic() - self.start)
        if self._log is not None:
            self._log.write(json.dumps(rec) + "\n")
            self._log.flush()
        return rec

    def message(self, text: str) -> None:
        """Print a plain line, keeping the live progress line intact below it."""
        self.progress.message(text)

    def close(self) -> None:
        """Finish the display and close the log; safe to call twice."""
        self.progress.close()
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
