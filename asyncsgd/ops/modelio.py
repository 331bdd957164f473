"""Trained model files: one HDF5 file holding the flat parameter vector, its per-layer views and what built it.

Layout (format ``asyncsgd-model``, version 1)::

    /params                float32 [n_params]  the parameter vector, as asyncsgd.model's Network.params
    /layers/<name>         each layer's weights, shaped (copies of slices of /params, for other tools)
    attrs: format, format_version, model, input_shape, n_classes, n_params,
           layout (JSON [[name, offset, shape], ...]), config (JSON), meta (JSON of every other meta key)

Written atomically (``asyncsgd.ops.atomic``), so a killed job never leaves a half-written model file.
"""
from __future__ import annotations

import json
import os

import numpy as np

from .atomic import atomic_path

__all__ = ["save_model", "load_model", "MODEL_FORMAT"]

MODEL_FORMAT = "asyncsgd-model"
_VERSION = 1


def _check_layout(params: np.ndarray, layout) -> list:
    out = []
    for entry in layout:
        try:
            name, offset, shape = entry
        except (TypeError, ValueError):
            raise ValueError(f"layout entries must be (name, offset, shape), got {entry!r}") from None
        shape = tuple(int(s) for s in shape)
        size = int(np.prod(shape, dtype=np.int64))
        if offset < 0 or offset + size > params.size:
            raise ValueError(f"layout entry {name!r} (offset {offset}, shape {shape}) lies outside the "
                             f"{params.size} parameters")
        out.append((str(name), int(offset), shape))
    return out


def save_model(path, params, layout, meta: dict) -> None:
    """Write a model file atomically.

    params: 1-D numpy array [n_params] (copy a GPU vector to the host first).
    layout: [(name, offset, shape), ...] as Network.param_layout().
    meta: 'model' (name), 'input_shape' (C, H, W), 'n_classes', 'config' (dict), and any other JSON-able keys.
    """
    import h5py

    params = np.asarray(params)
    if params.ndim != 1:
        raise ValueError(f"params must be the 1-D parameter vector, got shape {params.shape}")
    missing = [k for k in ("model", "input_shape", "n_classes") if k not in meta]
    if missing:
        raise ValueError(f"model meta lacks {missing}; give model, input_shape and n_classes")
    layout = _check_layout(params, layout)
    extra = {k: v for k, v in meta.items() if k not in ("model", "input_shape", "n_classes", "config")}
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("params", data=params)
            layers = f.create_group("layers")
            for name, offset, shape in layout:
                size = int(np.prod(shape, dtype=np.int64))
                # '/' would make nested groups; layer names are flat keys here.
                layers.create_dataset(name.replace("/", "."), data=params[offset:offset + size].reshape(shape))
            f.attrs["format"] = MODEL_FORMAT
            f.attrs["format_version"] = _VERSION
            f.attrs["model"] = str(meta["model"])
            f.attrs["input_shape"] = np.asarray(meta["input_shape"], dtype=np.int64)
            f.attrs["n_classes"] = int(meta["n_classes"])
            f.attrs["n_params"] = int(params.size)
            f.attrs["layout"] = json.dumps([[n, o, list(s)] for n, o, s in layout])
            f.attrs["config"] = json.dumps(meta.get("config") or {}, sort_keys=True, default=str)
            f.attrs["meta"] = json.dumps(extra, sort_keys=True, default=str)


def load_model(path):
    """Read a model file; return (params 1-D numpy array, meta dict).

    meta has 'model', 'input_shape' (tuple), 'n_classes', 'n_params', 'layout' ([(name, offset, shape)]),
    'config' (dict) and the extra keys saved.  Raises ValueError naming the file if it is not a valid model file.
    """
    import h5py

    path = os.fspath(path)
    if not os.path.exists(path):
        raise ValueError(f"model file {path} does not exist")
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("format") != MODEL_FORMAT:
                raise ValueError(f"{path} is not an asyncsgd model file (format attribute "
                                 f"{f.attrs.get('format')!r}); write one with --model-out")
            params = f["params"][...]
            meta = json.loads(f.attrs["meta"])
            meta.update(
                model=str(f.attrs["model"]),
                input_shape=tuple(int(v) for v in f.attrs["input_shape"]),
                n_classes=int(f.attrs["n_classes"]),
                n_params=int(f.attrs["n_params"]),
                layout=[(n, int(o), tuple(s)) for n, o, s in json.loads(f.attrs["layout"])],
                config=json.loads(f.attrs["config"]),
            )
    except (OSError, KeyError, TypeError, RuntimeError, json.JSONDecodeError) as exc:  # h5py: damaged file
        raise ValueError(f"model file {path} is unreadable or incomplete ({exc}); "
                         f"it may be truncated or not an asyncsgd model file") from None
    if params.ndim != 1 or params.size != meta["n_params"]:
        raise ValueError(f"model file {path} is inconsistent: /params has shape {params.shape}, "
                         f"n_params says {meta['n_params']}")
    return params, meta
