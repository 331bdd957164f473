"""Trained model files: one HDF5 file holding the flat parameter vector, its per-layer views and the architecture.

Layout (format ``asyncsgd-model``, version 2)::

    /params                float32 [n_params]  the parameter vector, as asyncsgd.model's Network.params
    /layers/<name>         each layer's weights, shaped (copies of slices of /params, for other tools)
    attrs: format, format_version, model, input_shape, n_classes, n_params,
           layout (JSON [[name, offset, shape], ...]), config (JSON), meta (JSON of every other meta key),
           spec (JSON list of layer specs, Network.spec(); version 2), name (the network's own name; version 2)

``model`` is what built the network: a registered name (``speech_cnn``) or a user factory's import path
(``mynets:small_cnn``).  ``spec`` lists the layers with their arguments, so ``load_model`` rebuilds the network
without the factory's code; version-1 files (no spec) load when ``model`` is a built-in.

- ``save_network(path, net, meta)`` writes a Network; ``save_model(path, params, layout, meta)`` writes a parameter
  vector (the architecture is ``meta["spec"]``, or derived by building ``meta["model"]`` when that is absent);
- ``load_model(path, ops=None) -> Network`` rebuilds the network with its parameters (``net.meta`` holds the rest);
- ``read_model(path) -> (params, meta)`` reads the file without building anything.

Written atomically (``asyncsgd.io.atomic``), so a killed job never leaves a half-written model file.
"""
from __future__ import annotations

import json
import os

import numpy as np

from asyncsgd.backends.numpy_ops import NumpyOps
from asyncsgd.io.atomic import atomic_path
from asyncsgd.model.builders import build_model
from asyncsgd.model.network import Network

__all__ = ["save_model", "save_network", "load_model", "read_model", "MODEL_FORMAT"]

MODEL_FORMAT = "asyncsgd-model"
_VERSION = 2
_KNOWN = ("model", "input_shape", "n_classes", "config", "spec", "name")


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


def _derive_spec(model, input_shape, n_classes, layout):
    """Return (spec, network name) of ``model`` built for this shape when its layout is ``layout``, else (None, None).

    The trainer saves parameter vectors by model name; building that model once on the host recovers its layers.
    """
    try:
        net = build_model(model, tuple(input_shape), int(n_classes), ops=NumpyOps())
    except (ValueError, TypeError):
        return None, None
    if [tuple(e) for e in net.param_layout()] != [tuple(e) for e in layout]:
        return None, None
    return net.spec(), net.name


def save_model(path, params, layout, meta: dict) -> None:
    """Write a model file atomically.

    params: 1-D numpy array [n_params] (copy a GPU vector to the host first).
    layout: [(name, offset, shape), ...] as Network.param_layout().
    meta: 'model' (a registered name or a factory's import path), 'input_shape' (C, H, W), 'n_classes', optional
    'spec' (Network.spec(); when absent, derived by building 'model' if its layout matches), 'name', 'config' (dict),
    and any other JSON-able keys.
    """
    import h5py

    params = np.asarray(params)
    if params.ndim != 1:
        raise ValueError(f"params must be the 1-D parameter vector, got shape {params.shape}")
    missing = [k for k in ("model", "input_shape", "n_classes") if k not in meta]
    if missing:
        raise ValueError(f"model meta lacks {missing}; give model, input_shape and n_classes")
    layout = _check_layout(params, layout)
    spec, name = meta.get("spec"), meta.get("name")
    if spec is None:
        spec, derived_name = _derive_spec(meta["model"], meta["input_shape"], meta["n_classes"], layout)
        name = name or derived_name
    extra = {k: v for k, v in meta.items() if k not in _KNOWN}
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w") as f:
            f.create_dataset("params", data=params)
            layers = f.create_group("layers")
            for lname, offset, shape in layout:
                size = int(np.prod(shape, dtype=np.int64))
                # '/' would make nested groups; layer names are flat keys here.
                layers.create_dataset(lname.replace("/", "."), data=params[offset:offset + size].reshape(shape))
            f.attrs["format"] = MODEL_FORMAT
            f.attrs["format_version"] = _VERSION
            f.attrs["model"] = str(meta["model"])
            f.attrs["name"] = str(name or meta["model"])
            f.attrs["input_shape"] = np.asarray(meta["input_shape"], dtype=np.int64)
            f.attrs["n_classes"] = int(meta["n_classes"])
            f.attrs["n_params"] = int(params.size)
            f.attrs["layout"] = json.dumps([[n, o, list(s)] for n, o, s in layout])
            f.attrs["spec"] = json.dumps(spec)
            f.attrs["config"] = json.dumps(meta.get("config") or {}, sort_keys=True, default=str)
            f.attrs["meta"] = json.dumps(extra, sort_keys=True, default=str)


def save_network(path, net, meta: dict | None = None) -> None:
    """Write Network ``net`` (its architecture and current parameters) atomically; ``meta`` adds JSON-able keys.

    The file records ``net.factory`` (set by ``build_model``/``resolve_model``; else ``net.name``) as 'model'.
    """
    meta = dict(meta or {})
    meta.setdefault("model", net.factory or net.name)
    meta.update(input_shape=list(net.input_shape), n_classes=net.n_classes, spec=net.spec(), name=net.name)
    save_model(path, net.ops.to_host(net.params), net.param_layout(), meta)


def read_model(path):
    """Read a model file; return (params 1-D numpy array, meta dict), building nothing.

    meta has 'model', 'name', 'input_shape' (tuple), 'n_classes', 'n_params', 'layout' ([(name, offset, shape)]),
    'spec' (list, or None when the file records none), 'config' (dict), 'format_version' and the extra keys saved.
    Raises ValueError naming the file if it is not a valid model file.
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
                name=str(f.attrs.get("name", f.attrs["model"])),
                input_shape=tuple(int(v) for v in f.attrs["input_shape"]),
                n_classes=int(f.attrs["n_classes"]),
                n_params=int(f.attrs["n_params"]),
                layout=[(n, int(o), tuple(s)) for n, o, s in json.loads(f.attrs["layout"])],
                spec=json.loads(f.attrs["spec"]) if "spec" in f.attrs else None,
                config=json.loads(f.attrs["config"]),
                format_version=int(f.attrs.get("format_version", 1)),
            )
    except (OSError, KeyError, TypeError, RuntimeError, json.JSONDecodeError) as exc:  # h5py: damaged file
        raise ValueError(f"model file {path} is unreadable or incomplete ({exc}); "
                         f"it may be truncated or not an asyncsgd model file") from None
    if params.ndim != 1 or params.size != meta["n_params"]:
        raise ValueError(f"model file {path} is inconsistent: /params has shape {params.shape}, "
                         f"n_params says {meta['n_params']}")
    return params, meta


def load_model(path, *, ops=None):
    """Return the Network saved in ``path`` with its parameters, rebuilt from the recorded layers (no user code).

    ``ops`` is the compute object to run it on (default: numpy).  The network's dtype is the saved parameters'
    (float32 or float64); ``net.factory`` is the recorded 'model' and ``net.meta`` the rest of ``read_model``'s meta.
    Raises ValueError naming the file when it cannot be rebuilt.
    """

    params, meta = read_model(path)
    ops = NumpyOps() if ops is None else ops
    spec, name = meta["spec"], meta["name"]
    if spec is None:          # version 1: the architecture is the built-in the file names
        spec, derived = _derive_spec(meta["model"], meta["input_shape"], meta["n_classes"], meta["layout"])
        if spec is None:
            raise ValueError(f"model file {path} records no layers and {meta['model']!r} does not rebuild it; "
                             f"save it again with asyncsgd.model.save_model(path, net)")
        name = derived
    dtype = params.dtype if params.dtype in (np.float32, np.float64) else np.float32
    try:
        net = Network.from_spec(name, spec, meta["input_shape"], meta["n_classes"], ops=ops, dtype=dtype)
    except (ValueError, TypeError) as exc:
        raise ValueError(f"model file {path}: its layers do not rebuild ({exc})") from None
    if net.n_params != params.size or [tuple(e) for e in net.param_layout()] != [tuple(e) for e in meta["layout"]]:
        raise ValueError(f"model file {path} is inconsistent: its layers need {net.n_params} parameters laid out as "
                         f"{net.param_layout()[:2]}..., the file holds {params.size}")
    net.params[...] = ops.to_device(params.astype(net.dtype, copy=False))
    net.factory = meta["model"]
    net.meta = meta
    return net
