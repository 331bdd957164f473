"""Checkpoints: everything ``--resume`` needs to continue a run, in one HDF5 file written atomically.

Layout (format ``asyncsgd-checkpoint``, version 1)::

    /params                float32 [n_params]   the store's parameter vector
    /state/<name>          any optimizer state: Adagrad sums, each worker's momentum, L-BFGS history, ...
    attrs: format, format_version, model_name, n_params, version (store pushes so far),
           config, data_position, seeds (JSON), crc32 (JSON {dataset: crc32 of its bytes}), written_unix

The file is written to a temporary name beside the destination, fsynced, renamed over it and the folder fsynced
(``asyncsgd.io.atomic``): a job killed while writing leaves the previous checkpoint whole.  CRC32 checksums of every
dataset catch files damaged later (copies cut short, bit rot), so ``--resume`` never continues from garbage.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
import zlib

import numpy as np

from asyncsgd.runtime.faults import fault_point
from asyncsgd.io.atomic import atomic_path

__all__ = ["Checkpoint", "save_checkpoint", "load_checkpoint", "CHECKPOINT_FORMAT"]

CHECKPOINT_FORMAT = "asyncsgd-checkpoint"
_VERSION = 1

# Called with each dataset's name right after it is written; tests set it to stop a writer half-way.
_after_dataset_hook = None


@dataclasses.dataclass
class Checkpoint:
    """A loaded checkpoint. params: 1-D [n_params]; state: name -> numpy array."""
    path: str
    params: np.ndarray
    state: dict
    version: int
    config: dict
    data_position: dict
    seeds: dict
    model_name: str
    n_params: int
    written_unix: float = 0.0


def _crc(array: np.ndarray) -> int:
    return zlib.crc32(np.ascontiguousarray(array).view(np.uint8).reshape(-1)) & 0xFFFFFFFF


def _json(obj, what: str) -> str:
    from asyncsgd.io.metrics import to_jsonable
    try:
        return json.dumps(to_jsonable(obj or {}), sort_keys=True)
    except TypeError as exc:
        raise ValueError(f"checkpoint {what} must be JSON-serialisable: {exc}") from None


def save_checkpoint(path, *, params, state: dict, version: int, config: dict, data_position: dict, seeds: dict,
                    model_name: str, n_params: int) -> None:
    """Write a checkpoint atomically; the previous file at ``path`` stays whole until the new one is complete.

    params: 1-D numpy array [n_params]; state: name -> numpy array ('/' in a name makes nested groups, e.g.
    'momentum/3'); version: the store's version counter; config, data_position, seeds: JSON-able dicts.
    """
    import h5py

    fault_point("checkpoint")
    params = np.asarray(params)
    if params.ndim != 1 or params.size != n_params:
        raise ValueError(f"checkpoint params must be 1-D with n_params={n_params} entries, got shape {params.shape}")
    arrays = {"params": params}
    for name, value in (state or {}).items():
        name = str(name).strip("/")
        if not name:
            raise ValueError("checkpoint state names must be non-empty")
        arrays[f"state/{name}"] = np.asarray(value)
    attrs = dict(format=CHECKPOINT_FORMAT, format_version=_VERSION, model_name=str(model_name),
                 n_params=int(n_params), version=int(version), config=_json(config, "config"),
                 data_position=_json(data_position, "data_position"), seeds=_json(seeds, "seeds"),
                 written_unix=time.time())
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            crcs = {}
            for name, array in arrays.items():
                f.create_dataset(name, data=array)
                crcs[name] = _crc(array)
                fault_point("checkpoint_write")  # test tool: a death with the file half-written
                if _after_dataset_hook is not None:
                    _after_dataset_hook(name)
            for key, value in attrs.items():
                f.attrs[key] = value
            f.attrs["crc32"] = json.dumps(crcs, sort_keys=True)


def _read(path: str):
    import h5py

    with h5py.File(path, "r") as f:
        if f.attrs.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"checkpoint {path} is not an asyncsgd checkpoint (format attribute "
                             f"{f.attrs.get('format')!r})")
        if int(f.attrs["format_version"]) > _VERSION:
            raise ValueError(f"checkpoint {path} has format version {int(f.attrs['format_version'])}; this asyncsgd "
                             f"reads up to {_VERSION}: upgrade asyncsgd")
        arrays = {}
        f.visititems(lambda name, obj: arrays.__setitem__(name, obj[...]) if isinstance(obj, h5py.Dataset) else None)
        return arrays, dict(f.attrs)


def load_checkpoint(path, *, expect_model: str | None = None, expect_n_params: int | None = None) -> Checkpoint:
    """Read and verify a checkpoint.

    Raises ValueError naming the file when it is missing, not a checkpoint, truncated or corrupt (checksum), or
    written for another model than ``expect_model`` / ``expect_n_params`` (when given).
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"checkpoint {path} does not exist")
    try:
        arrays, attrs = _read(path)
        crcs = json.loads(attrs["crc32"])
        ckpt = Checkpoint(
            path=path, params=arrays.pop("params"),
            state={name[len("state/"):]: a for name, a in arrays.items() if name.startswith("state/")},
            version=int(attrs["version"]), config=json.loads(attrs["config"]),
            data_position=json.loads(attrs["data_position"]), seeds=json.loads(attrs["seeds"]),
            model_name=str(attrs["model_name"]), n_params=int(attrs["n_params"]),
            written_unix=float(attrs.get("written_unix", 0.0)))
    except (OSError, KeyError, TypeError, RuntimeError, json.JSONDecodeError) as exc:  # h5py: damaged file
        raise ValueError(f"checkpoint {path} is unreadable or incomplete ({type(exc).__name__}: {exc}); it may be "
                         f"truncated or corrupt: resume from an older checkpoint or start afresh") from None
    for name, crc in crcs.items():
        array = ckpt.params if name == "params" else ckpt.state.get(name[len("state/"):])
        if array is None or _crc(array) != crc:
            raise ValueError(f"checkpoint {path} is corrupt: dataset {name} fails its checksum; resume from an "
                             f"older checkpoint or start afresh")
    if ckpt.params.ndim != 1 or ckpt.params.size != ckpt.n_params:
        raise ValueError(f"checkpoint {path} is inconsistent: params shape {ckpt.params.shape}, "
                         f"n_params {ckpt.n_params}")
    if (expect_model is not None and expect_model != ckpt.model_name) or \
            (expect_n_params is not None and int(expect_n_params) != ckpt.n_params):
        raise ValueError(f"checkpoint {path} was written for model {ckpt.model_name} with {ckpt.n_params} "
                         f"parameters; this run builds model {expect_model or ckpt.model_name} with "
                         f"{expect_n_params if expect_n_params is not None else '?'}: pass the same --model and "
                         f"data, or start without --resume")
    return ckpt
