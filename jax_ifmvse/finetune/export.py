"""Fine-tuning's outputs: RUN/hf/ (a transformers folder), RUN/head.safetensors (the baseline's
PyTorch names) and the prediction CSVs."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax.traverse_util import flatten_dict, unflatten_dict

from jax_ifmvse.backbones import whisper
from jax_ifmvse.backbones.conv_frontend import SSLBackbone
from jax_ifmvse.categories import CLASS_CODES, CLASS_NAMES, N_CLASSES
from jax_ifmvse.config import ATTRIBUTES
from jax_ifmvse.finetune.data import Rows
from jax_ifmvse.finetune.model import Spec
from jax_ifmvse.objective import softmax_np


def export_hf(spec: Spec, backbone_params: Any, folder: Path) -> None:
    """Write a transformers checkpoint folder: config.json, model.safetensors, preprocessor."""
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    config = spec.config
    if spec.family == "whisper":
        from transformers import WhisperFeatureExtractor

        sd = whisper.to_state_dict(backbone_params)
        config.architectures = ["WhisperModel"]
        seconds = spec.window_samples / whisper.SAMPLE_RATE
        fe = WhisperFeatureExtractor(feature_size=int(config.num_mel_bins), chunk_length=seconds)
    else:
        from transformers import Wav2Vec2FeatureExtractor

        sd = SSLBackbone.to_state_dict(backbone_params, config)
        config.architectures = [
            {"wavlm": "WavLMModel", "hubert": "HubertModel"}.get(spec.family, "Data2VecAudioModel")
        ]
        fe = Wav2Vec2FeatureExtractor(
            feature_size=1,
            sampling_rate=16000,
            padding_value=0.0,
            do_normalize=spec.do_normalize,
            return_attention_mask=True,
        )
    config.save_pretrained(str(folder))
    fe.save_pretrained(str(folder))
    tmp = folder / ".model.safetensors.tmp"
    save_file(sd, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, folder / "model.safetensors")


def head_state_dict(params: Any) -> dict[str, np.ndarray]:
    """Pooling and head params under the baseline's PyTorch names (`pool.*`, `ser.*`)."""
    out = {}
    for prefix, tree in (("pool", params["pool"]), ("ser", params["head"])):
        for path, v in flatten_dict(tree).items():
            v = np.asarray(v, np.float32)
            *mod, leaf = path
            # fc_0_0 -> fc.0.0, out_0 -> out.0; LayerNorm scale -> weight.
            mod = [m.replace("_", ".") if m.startswith(("fc_", "out_")) else m for m in mod]
            leaf = "weight" if leaf == "scale" else leaf
            out[".".join([prefix, *mod, leaf])] = np.ascontiguousarray(v)
    return out


def head_params(sd: dict[str, np.ndarray]) -> dict[str, Any]:
    """Inverse of `head_state_dict`: {pool, head} Flax params."""
    flat: dict[tuple[str, ...], Any] = {}
    for key, v in sd.items():
        prefix, *mod, leaf = key.split(".")
        if prefix == "ser":
            # fc.0.0 -> fc_0_0, out.0 -> out_0
            joined, mods, i = [], mod, 0
            while i < len(mods):
                if mods[i] == "fc":
                    joined.append(f"fc_{mods[i + 1]}_{mods[i + 2]}")
                    i += 3
                elif mods[i] == "out":
                    joined.append(f"out_{mods[i + 1]}")
                    i += 2
                else:
                    joined.append(mods[i])
                    i += 1
            mod = joined
            if mod[0].startswith("fc_") and mod[0].endswith("_1") and leaf == "weight":
                leaf = "scale"
        flat[("pool" if prefix == "pool" else "head", *mod, leaf)] = jnp.asarray(v)
    return unflatten_dict(flat)


def write_head(params: Any, spec: Spec, run: Path) -> None:
    """RUN/head.safetensors + RUN/head.json (the head's shape)."""
    from safetensors.numpy import save_file

    save_file(head_state_dict(params), str(run / "head.safetensors"))
    h = spec.head
    info = {
        "pooling": "AttentiveStatisticsPooling",
        "head": "EmotionRegression",
        "input_dim": 2 * spec.hidden_size,
        "hidden": h.hidden,
        "num_layers": h.num_layers,
        "dropout": h.dropout,
        "outputs": list(CLASS_CODES) if spec.task == "category" else list(ATTRIBUTES),
        "output_scale": "logits" if spec.task == "category" else "(y - 1) / 6",
    }
    (run / "head.json").write_text(json.dumps(info, indent=2))


def write_predictions(path: Path, rows: Rows, pred: np.ndarray) -> None:
    """id, file, arousal, valence, dominance (1..7 scale, unclipped; empty where it failed)."""
    with open(path, "w") as f:
        f.write("id,file," + ",".join(ATTRIBUTES) + "\n")
        for uid, p, v in zip(rows.ids, rows.paths, pred):
            vals = ",".join("" if not np.isfinite(x) else f"{x:.6f}" for x in v)
            f.write(f"{uid},{Path(p).name},{vals}\n")


def write_category_predictions(path: Path, rows: Rows, logits: np.ndarray) -> None:
    """Task 1: id, file, category (A..N), then each class's probability (Angry..Neutral)."""
    probs = softmax_np(logits)
    with open(path, "w") as f:
        f.write("id,file,category," + ",".join(CLASS_NAMES) + "\n")
        for uid, p, q in zip(rows.ids, rows.paths, probs):
            if not np.isfinite(q).all():
                f.write(f"{uid},{Path(p).name},{',' * (N_CLASSES - 1)}\n")
                continue
            vals = ",".join(f"{x:.6f}" for x in q)
            f.write(f"{uid},{Path(p).name},{CLASS_CODES[int(np.argmax(q))]},{vals}\n")
