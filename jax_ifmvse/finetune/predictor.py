"""Scoring audio with a fine-tuned RUN/: `FinetunedPredictor`, the `predictor.RunPredictor` of
`predict` and `serve` (imports no training code)."""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jax_ifmvse.backbones import load_backbone
from jax_ifmvse.config import ATTRIBUTES, load_config
from jax_ifmvse.data.corpus import from_unit
from jax_ifmvse.encode import Loader, backbone_plan
from jax_ifmvse.finetune.data import AudioFeed, Rows, header_info, predict_rows
from jax_ifmvse.finetune.export import head_params
from jax_ifmvse.finetune.model import make_predict, make_spec
from jax_ifmvse.objective import softmax_np
from jax_ifmvse.parallel import data_mesh
from jax_ifmvse.predictor import Prediction, Predictor, Scored
from jax_ifmvse.trainer.rundir import read_finished


class FinetunedModel:
    """A fine-tuned RUN/ loaded for scoring: RUN/hf/ through `load_backbone`, plus the head."""

    def __init__(self, run: str | Path, mesh: Mesh | None = None):
        from safetensors.numpy import load_file

        run = Path(run)
        self.manifest = manifest = read_finished(run, "finetune.json", "finetune")
        cfg = load_config(run / "config.yaml")
        bb = load_backbone(str(run / "hf"), dtype=cfg.finetune.compute_dtype)
        bb, _, max_s, self.buckets = backbone_plan(bb, cfg)
        self.spec = make_spec(bb, cfg)
        head = head_params(load_file(str(run / "head.safetensors")))
        self.params = {"backbone": bb.params, **head}
        self.mesh = mesh or data_mesh()
        self.sr = cfg.audio.sample_rate
        self.normalize_labels = cfg.corpus.normalize_labels
        self.task = cfg.finetune.task
        stats = None
        if cfg.audio.normalize == "train":
            s = manifest.get("normalize_stats")
            stats = tuple(s) if s else None
        self.loader = Loader(self.sr, max_s, cfg.audio.normalize, stats)
        self.max_s = max_s
        self.rows = -(-cfg.finetune.eval_batch // self.mesh.devices.size) * self.mesh.devices.size
        self._predict = make_predict(self.spec)

    def predict_files(self, files: Sequence[str | Path]) -> tuple[np.ndarray, list[str | None]]:
        """(N, 3) attributes on 1..7 (clipped), or task 1's (N, 8) class probabilities; NaN
        where unreadable; and per-file errors."""
        rows = Rows(
            [str(f) for f in files],
            [Path(f) for f in files],
            header_info(files)[0],
            np.full((len(files), 3), np.nan, np.float32),
        )
        feed = AudioFeed(self.loader, int(round(self.max_s * self.sr)), 2, cache=False)
        try:
            pred = predict_rows(
                self._predict, self.params, rows, feed, self.buckets, self.rows, self.sr,
                NamedSharding(self.mesh, P("data")), self.spec.n_outputs,
            )  # fmt: skip
        finally:
            feed.close()
        if self.task == "category":
            return softmax_np(pred), [feed.failed.get(str(Path(f))) for f in files]
        pred = from_unit(pred, clip=True) if self.normalize_labels else pred
        errors = [feed.failed.get(str(Path(f))) for f in files]
        return pred, errors


class FinetunedPredictor:
    """`predictor.Predictor`'s interface over a fine-tuned RUN/ (for `predict` and `serve`).

    A file that cannot be decoded gets empty scores and its error, or with
    `fallback="label-mean"` the Train label mean marked in `fallback`, as `Predictor` does.
    """

    def __init__(self, run: str | Path, *, max_clips: int = 16, fallback: str = "none"):
        self.run = Path(run)
        self.fallback = fallback
        self.model = FinetunedModel(self.run)
        self.max_clips = max(1, int(max_clips))
        self.manifest = manifest = self.model.manifest
        self.label_mean = manifest.get("train_label_mean") or {}
        self.ready = False
        self.warmup_s: float | None = None

    def warm_up(self) -> float:
        """Compile the scoring program of every bucket once; returns seconds taken."""
        t = time.perf_counter()
        m = self.model
        sharding = NamedSharding(m.mesh, P("data"))
        for sec in m.buckets:
            w = jax.device_put(np.zeros((m.rows, int(round(sec * m.sr))), np.float32), sharding)
            n = jax.device_put(np.ones(m.rows, np.int32), sharding)
            jax.block_until_ready(m._predict(m.params, w, n))
        self.ready, self.warmup_s = True, time.perf_counter() - t
        return self.warmup_s

    def programs(self) -> dict[str, list[list[int]]]:
        """The (batch, samples) shapes scored, one per bucket."""
        m = self.model
        name = self.manifest["backbone"]["name"]
        return {name: [[m.rows, int(round(s * m.sr))] for s in m.buckets]}

    def predict_files(self, files: Sequence[str | Path]) -> list:
        """One `predictor.Scored` per file, in order."""
        category = self.model.task == "category"
        pred, errors = self.model.predict_files(files)
        durations, rates = header_info(files)
        mean = tuple(float(self.label_mean.get(a, np.nan)) for a in ATTRIBUTES)
        out = []
        for f, p, err, d, rate in zip(files, pred, errors, durations, rates, strict=True):
            ok = err is None and np.isfinite(p).all()
            dur = float(d) if np.isfinite(d) else None
            flags = []
            if dur is not None and dur > self.model.max_s + 1e-6:
                flags.append("cropped")
            if rate and int(rate) != int(self.model.sr):
                flags.append(f"resampled from {int(rate)} Hz")
            task1 = {}
            if ok and category:  # task 1 runs have no attributes: values stay None
                values, fallback, task1 = None, "", Predictor._task1(p)
            elif ok:
                values, fallback = tuple(float(x) for x in p), ""
            elif self.fallback == "label-mean" and not category:
                values, fallback = mean, "Train label mean"
            else:
                values, fallback = None, ""  # never an invented score
            prediction = Prediction(
                str(f), values, None if ok else (err or "failed"), fallback,
                duration_s=dur, flags=tuple(sorted(flags)), **task1,
            )  # fmt: skip
            out.append(Scored(prediction, dur, prediction.flags, None if ok else err))
        return out

    def info(self) -> dict:
        """What `GET /info` reports: the fine-tuned backbone, its head and programs."""
        b = self.manifest["backbone"]
        return {
            "run": str(self.run),
            "kind": "finetune",
            "backbones": {
                b["name"]: {
                    "source": str(self.run / "hf"),
                    "finetuned_from": b.get("source"),
                    "model_type": b.get("model_type"),
                    "compute_dtype": self.manifest["config"]["finetune"]["compute_dtype"],
                }
            },
            "best": self.manifest.get("best"),
            "train_label_mean": self.label_mean,
            "programs": self.programs(),
            "warmup_s": self.warmup_s,
        }
