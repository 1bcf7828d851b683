"""What a score-set run trains and predicts with: its models per score set and their label scale.

`model_specs` turns `train.tasks` into the models trained per score set (per attribute, one
multitask model, `category`, or one `joint` model), each with its `Objective`; `build_model` builds
one head. `train` trains them and `inference` loads them; neither depends on the other for this.
"""

from __future__ import annotations

import dataclasses

import flax.linen as nn
import numpy as np

from jax_ifmvse.categories import N_CLASSES
from jax_ifmvse.config import ATTRIBUTES, Config, ScoreSetConfig
from jax_ifmvse.data.corpus import from_unit, to_unit
from jax_ifmvse.heads import build_score_model
from jax_ifmvse.objective import Objective


def to_train_scale(y: np.ndarray, normalize: bool) -> np.ndarray:
    """Corpus scale 1..7 -> training targets ((y - 1) / 6 when normalising)."""
    return to_unit(y) if normalize else y


def to_corpus_scale(y, normalize: bool):
    """Training scale -> corpus scale 1..7, unclipped (dev CCC and the ensemble see raw scores);
    numpy or JAX arrays alike (`from_unit`)."""
    return from_unit(y, clip=False) if normalize else y


TASKS = ("attributes", "category", "gender")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """One model trained per score set: its directory name and the tasks it outputs."""

    name: str
    attributes: tuple[str, ...]
    category: bool = False
    gender: bool = False

    def objective(self, cfg: Config, class_w: np.ndarray | None = None) -> Objective | None:
        """The model's `Objective`; None for an attributes-only model (the paper's loss path)."""
        if not (self.category or self.gender):
            return None
        t = cfg.train
        return Objective(
            attributes=self.attributes,
            category=self.category,
            gender=self.gender,
            class_weights=None if class_w is None else tuple(float(w) for w in class_w),
            attributes_weight=t.attributes_weight,
            category_weight=t.category_weight,
            gender_weight=t.gender_weight,
            normalize=cfg.corpus.normalize_labels,
        )

    @property
    def n_out(self) -> int:
        return len(self.attributes) + N_CLASSES * self.category + 2 * self.gender


def model_specs(cfg: Config) -> list[ModelSpec]:
    """The models trained per score set for `train.tasks`: per attribute (or one multitask
    model) for attributes alone, `category` for task 1 alone, one `joint` model otherwise."""
    # Names, distinctness and gender beside another task: config rules, checked at load.
    attrs = list(cfg.train.attributes)
    tasks = list(cfg.train.tasks)
    if tasks == ["attributes"]:
        if cfg.train.multitask:
            return [ModelSpec("multitask", ATTRIBUTES)]
        return [ModelSpec(a, (a,)) for a in attrs]
    gender = "gender" in tasks
    if "attributes" not in tasks:
        return [ModelSpec("category", (), True, gender)]
    return [
        ModelSpec("joint", tuple(a for a in ATTRIBUTES if a in attrs), "category" in tasks, gender)
    ]


def model_targets(cfg: Config) -> list[tuple[str, list[str]]]:
    """(directory name, attributes) of each model trained per score set."""
    return [(m.name, list(m.attributes)) for m in model_specs(cfg)]


def build_model(
    cfg: Config, ss: ScoreSetConfig, view_dims: dict[str, int], n_out: int
) -> nn.Module:
    return build_score_model(ss, cfg.model, view_dims, n_out)
