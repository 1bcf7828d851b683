"""The device mesh and running a model over many rows sharded on it (training and inference)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P


def make_predict(model: nn.Module) -> Callable[[Any, dict], jax.Array]:
    """Jitted inference `(params, features) -> (N, K)` (dropout off)."""
    return jax.jit(lambda params, feats: model.apply({"params": params}, feats, train=False))


def predict_np(
    predict: Callable,
    params: Any,
    features: Mapping[str, np.ndarray],
    mesh: Mesh,
    chunk: int = 8192,
) -> np.ndarray:
    """Predictions for N rows, run in fixed-size chunks sharded over the mesh (rows padded)."""
    n = len(next(iter(features.values())))
    ndev = mesh.devices.size
    size = ndev * math.ceil(min(max(n, 1), chunk) / ndev)
    sharding = NamedSharding(mesh, P("data"))
    outs = []
    for s in range(0, max(n, 1), size):  # zero rows: one padded chunk, for the output's shape
        part = {}
        for k, v in features.items():
            x = v[s : s + size]
            if len(x) < size:
                x = np.concatenate([x, np.zeros((size - len(x), *x.shape[1:]), x.dtype)])
            part[k] = jax.device_put(x, sharding)
        outs.append(np.asarray(predict(params, part))[: max(0, min(size, n - s))])
    return np.concatenate(outs)


def predict_frames(
    predict: Callable, params: Any, frames: Any, mesh: Mesh, batch: int | None = None
) -> np.ndarray:
    """Predictions for every row of `frames` (`loaders.StreamedFrames`), read in batches sorted
    by length (`batch` rows rounded up to the devices, `loader.eval_batch` by default) and put
    back in row order; no split is ever held."""
    ndev = mesh.devices.size
    size = ndev * math.ceil((batch or frames.settings.eval_batch) / ndev)
    sharding = NamedSharding(mesh, P("data"))
    keys = [*frames.views, *(f"{v}:mask" for v in frames.views)]
    out = None
    for b in frames.eval_stream(size):
        y = np.asarray(predict(params, jax.device_put({k: b[k] for k in keys}, sharding)))
        if out is None:
            out = np.zeros((len(frames), *y.shape[1:]), np.float32)
        real = b["positions"] >= 0
        out[b["positions"][real]] = y[real]
    return out if out is not None else np.zeros((0, 1), np.float32)


def predict_rows(predict: Callable, params: Any, features: Any, mesh: Mesh) -> np.ndarray:
    """`predict_np` over arrays in memory, `predict_frames` over streamed frames."""
    if isinstance(features, Mapping):
        return predict_np(predict, params, features, mesh)
    return predict_frames(predict, params, features, mesh)


def data_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh with a `data` axis over every (or the given) device."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), ("data",))
