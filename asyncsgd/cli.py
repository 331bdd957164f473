"""Every option of ``python -m asyncsgd.train``: one table, read by the command line and by TOML config files.

A config file holds the same names as the options, with dashes or underscores (``n_push = 4``); the command line
overrides it.  The command line only maps flags to the option dataclasses (``to_options``): every value is checked
by its option class (asyncsgd.options), and the rules that need the mode, the job size or the data by the run's plan
(asyncsgd.plan); this module adds only the rules about a flag given to a mode that takes no such option.  Every rank
checks identically and before any rank starts work, so the job fails with one clear line from rank 0
(``asyncsgd.train`` prints it).
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from asyncsgd.runtime.mpi import UsageError
from asyncsgd.options import (DEFAULT_LR_SCHEDULE, DEFAULT_SELECTION_MARGIN, DEFAULT_VALIDATION, OPTIMIZERS,
                              CheckpointOptions, DownpourOptions, OptionError, SandblasterOptions, SGDOptions, Stop,
                              parse_staleness)
from asyncsgd.plan import MODES

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

__all__ = ["build_parser", "parse_config", "to_options", "usage_error", "MODES", "MODELS",
           "DEFAULT_DATA", "parse_slow_ranks", "parse_kill_ranks", "config_to_dict", "to_toml", "OUTPUT_OPTIONS"]

MODELS = ("speech_cnn", "mnist_cnn", "logreg")
DEFAULT_DATA = "fsdd"  # the bundled features, data/fsdd.h5 (asyncsgd.data.resolve_path)


def _number(s, kind, what: str):
    """Parse ``s`` as ``kind`` (int or float) for an option's type; ArgumentTypeError saying ``what`` it must be
    (argparse's own message names the Python function instead: "invalid _nonneg_int value")."""
    try:
        return kind(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {what}, got {s!r}") from None


def _positive_int(s):
    v = _number(s, int, "a positive integer")
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {s}")
    return v


def _nonneg_int(s):
    v = _number(s, int, "an integer >= 0")
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def _positive_float(s):
    v = _number(s, float, "a number > 0")
    if not v > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return v


def _nonneg_float(s):
    v = _number(s, float, "a number >= 0")
    if not v >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {s}")
    return v


def _stop_file(s):
    """--stop-file: a file path in a folder that exists (asyncsgd.runtime.stop_request)."""
    from asyncsgd.runtime.stop_request import stop_file_problem
    problem = stop_file_problem(s)
    if problem is not None:
        raise argparse.ArgumentTypeError(problem)
    return s


def _rank_map(spec: str, flag: str, value_name: str, valid, bound: str) -> dict:
    """Parse ``RANK:VALUE[,RANK:VALUE]`` into {rank: value}: ranks >= 0, ``valid(value)``.  Whether a rank is in the
    job is the plan's rule (asyncsgd.plan.ranks_in_job), checked once the job's size is known."""
    out = {}
    if not spec:
        return out
    for part in spec.split(","):
        try:
            r, v = part.split(":")
            r, v = int(r), float(v)
        except ValueError:
            raise UsageError(f"{flag} takes RANK:{value_name}[,RANK:{value_name}], got {spec!r}") from None
        if r < 0 or not valid(v):
            raise UsageError(f"{flag}: rank {r} must be in 0..? and {bound.format(v)}")
        out[r] = v
    return out


def parse_slow_ranks(spec: str):
    """Parse ``--slow-ranks RANK:FACTOR[,RANK:FACTOR]`` into {rank: factor}; factors must be >= 1."""
    return _rank_map(spec, "--slow-ranks", "FACTOR", lambda f: f >= 1, "factor {} >= 1")


# ---- fault tolerance (Downpour under `mpirun --with-ft ulfm`; docs/FAULT_TOLERANCE.md) ----------------------------

def parse_kill_ranks(spec: str):
    """Parse ``--kill-ranks RANK:SECONDS[,RANK:SECONDS]`` into {rank: seconds}; seconds of training, >= 0."""
    return _rank_map(spec, "--kill-ranks", "SECONDS", lambda t: 0 <= t < float("inf"), "seconds {:g} >= 0")


_FT_OPTIONS = [
    (("--fault-tolerance",), dict(choices=("auto", "on", "off"), default="auto",
                                  help="downpour, sync, sandblaster: keep training when a rank other than 0 dies; "
                                       "auto (default) = on under Open MPI's `mpirun --with-ft ulfm`")),
    (("--kill-ranks",), dict(default="", help="RANK:SECONDS[,..]: those ranks SIGKILL themselves after SECONDS of "
                                              "training, for tests and benchmarks only")),
]


# (flags, argparse keywords).  The dest of each is the TOML key (underscores).
_OPTIONS = [
    (("--mode",), dict(choices=MODES, default="downpour",
                       help="downpour (asynchronous, default), sync (all-reduce), sandblaster (L-BFGS), serial")),
    (("--model",), dict(default="speech_cnn",
                        help="network to train: speech_cnn (default), mnist_cnn, logreg, or a factory of your own "
                             "as PACKAGE.MODULE:FUNCTION (importable from the working directory)")),
    (("--data",), dict(default=DEFAULT_DATA,
                       help="HDF5 file, 'fsdd' (bundled speech features, default) or 'synthetic:N'")),
    (("--device",), dict(choices=("cpu", "gpu", "auto"), default="cpu",
                         help="cpu (numpy), gpu (CuPy; error without a GPU) or auto")),
    (("--cuda-aware-mpi",), dict(action="store_true", help="hand device buffers to MPI directly (GPU ranks)")),
    (("--seed",), dict(type=_nonneg_int, default=0, help="seed of initialisation, shuffling and dropout")),
    # how long
    (("--epochs",), dict(type=_positive_float, default=None, help="passes over the training set (all workers together)")),
    (("--steps",), dict(type=_positive_int, default=None, help="mini-batch steps per worker")),
    (("--time-limit",), dict(type=_positive_float, default=None, help="stop after this many seconds")),
    (("--target-accuracy",), dict(type=float, default=None,
                                  help="stop once validation accuracy reaches this (0-1; test accuracy with "
                                       "--validation 0 and in sandblaster)")),
    (("--patience",), dict(type=_positive_int, default=None,
                           help="stop after N evaluations without a better validation accuracy (default: never)")),
    (("--validation",), dict(type=float, default=None,
                             help="fraction of the training set held out, class-balanced, to choose the model with "
                                  "(SGD modes; default 0.1; 0 = none); the test set is only reported")),
    (("--selection-margin",), dict(type=_nonneg_float, default=None,
                                   help="select the best-validation model over the last one only when better by "
                                        "more than this many standard errors (default 2; 0 = whenever better)")),
    # SGD
    (("--batch-size",), dict(type=_positive_int, default=None,
                             help="mini-batch size (SGD modes); L-BFGS batch (sandblaster, default: whole set)")),
    (("--lr",), dict(type=_positive_float, default=None,
                     help="learning rate, the schedule's peak (default depends on mode/optimizer)")),
    (("--lr-schedule",), dict(default=None,
                              help="rate over the run (SGD modes): constant, cosine[:FLOOR], linear[:FLOOR], "
                                   "step:GAMMA@M1,M2,..., optionally after warmup:W+ (fractions of the run); "
                                   "default warmup:0.05+cosine")),
    (("--momentum",), dict(type=_nonneg_float, default=None, help="momentum on each replica (0 = none)")),
    (("--optimizer",), dict(choices=OPTIMIZERS, default="sgd", help="update at the store: sgd or adagrad")),
    (("--adagrad-eps",), dict(type=_positive_float, default=1e-6,
                              help="Adagrad epsilon: step = lr * g / sqrt(sum g^2 + eps)")),
    # Downpour
    (("--servers",), dict(type=_positive_int, default=1, help="ranks that host parameter shards")),
    (("--n-fetch",), dict(type=_positive_int, default=1, help="fetch parameters every N steps")),
    (("--n-push",), dict(type=_positive_int, default=1, help="push the accrued gradient every N steps")),
    (("--staleness-decay",), dict(default="none", help="scale each push by none, inverse (1/tau) or exp:LAMBDA")),
    (("--sparsity",), dict(type=float, default=1.0,
                           help="fraction of the accrued gradient pushed (largest magnitudes; 1.0 = dense)")),
    (("--sparse-block",), dict(type=_positive_int, default=1,
                               help="sparse pushes choose whole blocks of B consecutive entries (cheap across a "
                                    "network); 1 = single entries")),
    (("--overlap",), dict(nargs="?", const="push", default="off", choices=("off", "push", "all"),
                          help="communicate in a thread while the worker computes: off, push (the push travels; "
                               "the default of a bare --overlap) or all (the next fetch too, one interval older)")),
    (("--augment",), dict(default="auto",
                          help="training-time augmentation: auto (time shifts of up to 6 frames on log-mel data), "
                               "none, or shift:N")),
    (("--warm-start-steps",), dict(type=_nonneg_int, default=None,
                                   help="steps taken by one replica alone before the others start (DistBelief's "
                                        "warm start; default: the first 9%% of the run's samples; 0 = none)")),
    (("--eval-every",), dict(type=_positive_float, default=5.0, help="seconds between test evaluations (rank 0)")),
    # Sandblaster
    (("--history",), dict(type=int, default=10, help="L-BFGS history pairs (>= 1)")),
    (("--mini-shard-size",), dict(type=_positive_int, default=None, help="examples per mini-shard")),
    (("--max-iter",), dict(type=_positive_int, default=None,
                           help="L-BFGS iterations at most (default 1000 for logreg, 100 for the CNNs)")),
    (("--grad-tol",), dict(type=_nonneg_float, default=1e-6, help="stop when |gradient| falls below this")),
    (("--loss-tol",), dict(type=_nonneg_float, default=1e-10, help="stop when the relative loss decrease falls below")),
    (("--l2",), dict(type=_nonneg_float, default=None, help="L2 penalty (sandblaster; default 1e-4 for logreg)")),
    (("--schedule",), dict(choices=("dynamic", "static"), default="dynamic",
                           help="sandblaster: dynamic mini-shards with backups, or a static even split (benchmark)")),
    (("--slow-ranks",), dict(default="", help="RANK:FACTOR[,..]: make ranks slower, for tests and benchmarks only")),
    # outputs and operations
    (("--run-dir",), dict(default=None,
                          help="folder for this run's outputs (model.h5, metrics.jsonl, summary.json, config.toml); "
                               "default: a new runs/YYYYmmdd-HHMMSS/; 'none' writes only the files named below")),
    (("--log",), dict(default=None, help="JSONL metrics log (one record per evaluation)")),
    (("--summary-json",), dict(default=None, help="write the run's summary here")),
    (("--model-out",), dict(default=None, help="write the final model (HDF5) here")),
    (("--checkpoint",), dict(default=None, help="checkpoint file (default: next to --model-out or runs/)")),
    (("--checkpoint-every",), dict(type=_positive_float, default=None, help="seconds between checkpoints")),
    (("--resume",), dict(default=None, help="checkpoint file to continue from, or 'auto' (the --checkpoint file)")),
    (("--stop-file",), dict(type=_stop_file, default=None,
                            help="downpour: end the run cleanly once this file exists (or on SIGTERM): the workers "
                                 "end their step, rank 0 writes the checkpoint, the summary says stop_reason "
                                 "'preempted' and --resume auto continues; jobs/*.sh create it before SLURM's "
                                 "time limit (needs --checkpoint)")),
    (("--progress",), dict(choices=("auto", "bar", "lines", "none"), default="auto",
                           help="progress display on rank 0: a live line on a terminal, plain lines otherwise")),
    (("--config",), dict(default=None, help="TOML file of options; the command line overrides it")),
    (("--print-config",), dict(action="store_true", help="print the resolved configuration as TOML and exit")),
]


def build_parser(parser_class=argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Return the trainer's argument parser (``parser_class`` lets parse_config raise instead of exiting)."""
    p = parser_class(
        prog="python -m asyncsgd.train",
        description="Train a CNN with Downpour SGD (default), synchronous SGD, Sandblaster L-BFGS or serially. "
                    "Run the distributed modes under mpiexec, e.g. mpirun -n 6 python -m asyncsgd.train.")
    for flags, kw in _OPTIONS + _FT_OPTIONS:
        p.add_argument(*flags, **kw)
    return p


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that raises UsageError instead of printing and exiting (rank 0 prints once)."""

    def error(self, message):
        raise UsageError(message)


def _toml_defaults(path: str, parser) -> dict:
    if not os.path.exists(path):
        raise UsageError(f"--config: {path} does not exist")
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise UsageError(f"--config: {path} is not valid TOML: {exc}") from None
    known = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    out = {}
    for key, value in raw.items():
        dest = key.replace("-", "_")
        if dest not in known:
            raise UsageError(f"--config: {path}: unknown key {key!r}")
        action = known[dest]
        if action.type is not None and value is not None and not isinstance(value, bool):
            try:
                value = action.type(str(value))
            except (argparse.ArgumentTypeError, ValueError) as exc:
                raise UsageError(f"--config: {path}: {key} = {value!r}: {exc}") from None
        if action.choices is not None and value not in action.choices:
            raise UsageError(f"--config: {path}: {key} must be one of {', '.join(action.choices)}, got {value!r}")
        out[dest] = value
    return out


def parse_config(argv=None) -> argparse.Namespace:
    """Parse the command line (and the TOML file it names); raise UsageError on a value argparse refuses (the
    option classes check the rest: ``to_options``)."""
    if argv is None:
        argv = sys.argv[1:]
    parser = build_parser(_Parser)
    pre, _ = parser.parse_known_args(argv) if "--help" not in argv and "-h" not in argv else (None, None)
    if pre is not None and pre.config:
        parser.set_defaults(**_toml_defaults(pre.config, parser))
    return parser.parse_args(argv)


def usage_error(exc: OptionError) -> UsageError:
    """The command line's wording of an option error: the field as its --flag."""
    flag = {"staleness": "staleness-decay"}.get(exc.field, exc.field.replace("_", "-"))
    return UsageError(f"--{flag} {exc.detail}")


def to_options(cfg):
    """Map the parsed command line to ``(options, stop, checkpoint)`` for ``cfg.mode`` (asyncsgd.options).

    Every flag's value is checked by the option class it maps to, whatever the mode (the SGD flags by
    DownpourOptions, the L-BFGS flags by SandblasterOptions), so a bad value never waits for the mode that reads it.
    Raises UsageError naming the --flag of a bad value, or of a flag the mode takes no option for.
    """
    _check_flags_apply(cfg)
    try:
        stop = Stop(epochs=cfg.epochs, steps=cfg.steps, time_limit=cfg.time_limit,
                    target_accuracy=cfg.target_accuracy, patience=cfg.patience, stop_file=cfg.stop_file)
        checkpoint = None
        if cfg.checkpoint is not None or cfg.checkpoint_every is not None or cfg.resume is not None:
            checkpoint = CheckpointOptions(path=cfg.checkpoint, every=cfg.checkpoint_every, resume=cfg.resume)
        ft = dict(fault_tolerance=cfg.fault_tolerance, kill_ranks=parse_kill_ranks(cfg.kill_ranks))
        sgd = dict(lr=cfg.lr, momentum=cfg.momentum, batch_size=cfg.batch_size, optimizer=cfg.optimizer,
                   adagrad_eps=cfg.adagrad_eps, augment=cfg.augment, seed=cfg.seed, eval_every=cfg.eval_every,
                   lr_schedule=DEFAULT_LR_SCHEDULE if cfg.lr_schedule is None else cfg.lr_schedule,
                   validation=DEFAULT_VALIDATION if cfg.validation is None else cfg.validation,
                   selection_margin=(DEFAULT_SELECTION_MARGIN if cfg.selection_margin is None
                                     else cfg.selection_margin))
        downpour = DownpourOptions(**sgd, servers=cfg.servers, n_fetch=cfg.n_fetch, n_push=cfg.n_push,
                                   staleness=parse_staleness(cfg.staleness_decay), sparsity=cfg.sparsity,
                                   sparse_block=cfg.sparse_block, overlap=cfg.overlap,
                                   warm_start_steps=cfg.warm_start_steps, **ft)
        sandblaster = SandblasterOptions(
            batch_size=cfg.batch_size, mini_shard_size=cfg.mini_shard_size, max_iter=cfg.max_iter,
            history=cfg.history, grad_tol=cfg.grad_tol, loss_tol=cfg.loss_tol, l2=cfg.l2,
            schedule=cfg.schedule, seed=cfg.seed, slow_ranks=parse_slow_ranks(cfg.slow_ranks), **ft)
    except OptionError as exc:
        raise usage_error(exc) from None
    if cfg.mode == "sandblaster" and cfg.lr_schedule is not None and not downpour.lr_schedule.is_constant:
        raise UsageError("--lr-schedule: L-BFGS has no learning rate (the line search sets each step); "
                         "--lr-schedule applies to --mode serial, sync and downpour")
    options = {"downpour": downpour, "sandblaster": sandblaster,
               "sync": SGDOptions(**sgd, **ft), "serial": SGDOptions(**sgd)}[cfg.mode]
    return options, stop, checkpoint


def _check_flags_apply(cfg):
    """The flags given to a mode whose options have no such field (or a feature not built yet)."""
    if cfg.mode == "serial" and (cfg.kill_ranks or cfg.fault_tolerance == "on"):
        raise UsageError("--fault-tolerance on and --kill-ranks do not apply to --mode serial (one process); use "
                         "--mode downpour, sync or sandblaster under mpirun --with-ft ulfm")
    if cfg.mode == "sandblaster" and cfg.validation:
        raise UsageError("--validation applies to --mode serial, sync and downpour; sandblaster trains on the "
                         "whole training set (leave it out)")
    if cfg.mode == "sandblaster" and cfg.servers != 1:
        raise UsageError("--servers applies to --mode downpour only")
    if cfg.cuda_aware_mpi:
        raise UsageError("--cuda-aware-mpi is not available yet: GPU ranks stage window traffic through pinned "
                         "host buffers; leave the option out")


OUTPUT_OPTIONS = ("run_dir", "log", "summary_json", "model_out")


def config_to_dict(cfg) -> dict:
    """Return the configuration as a plain, JSON/TOML-serialisable dict (for logs, checkpoints, --print-config)."""
    return {k: v for k, v in sorted(vars(cfg).items()) if k not in ("print_config", "config")}


def to_toml(cfg, *, skip=()) -> str:
    """Render the configuration as TOML (unset options, and those in ``skip``, are left out: TOML has no null)."""
    lines = []
    for k, v in config_to_dict(cfg).items():
        if v is None or k in skip:
            continue
        lines.append(f"{k} = {json.dumps(v) if not isinstance(v, bool) else str(v).lower()}")
    return "\n".join(lines) + "\n"
