"""Score-set models: single-view MLP heads and two-view IF-MVSE fusion heads."""

from __future__ import annotations

import flax.linen as nn

from jax_ifmvse.config import ModelConfig, ScoreSetConfig
from jax_ifmvse.errors import IfmvseError
from jax_ifmvse.heads.fusion import (
    FusionModel,
    LayerSum,
    SelfBalancingGate,
    SingleViewModel,
    ViewInput,
    interactive_attention,
)
from jax_ifmvse.heads.mlp import MLPHead, MLPPath


class HeadConfigError(IfmvseError, ValueError):
    """A score set that cannot be built (unknown kind, wrong number of views, missing backbone)."""


def build_score_model(
    score_set: ScoreSetConfig, model_cfg: ModelConfig, view_dims: dict[str, int], n_outputs: int
) -> nn.Module:
    """The Flax model of one score set; it maps {view: (B, D) or (B, L, D)} to (B, n_outputs)."""
    # `kind`, `model.init` and `model.pooling` are `choice()` fields: checked as a config loads.
    want = {"mlp": 1, "fusion": 2}[score_set.kind]
    if len(score_set.views) != want:
        raise HeadConfigError(
            f"score set {score_set.name}: kind {score_set.kind} takes {want} view(s), got {list(score_set.views)}"
        )
    missing = [v for v in score_set.views if v not in view_dims]
    if missing:
        raise HeadConfigError(
            f"score set {score_set.name}: backbone(s) {missing} not in the store (has {sorted(view_dims)})"
        )
    if n_outputs < 1:  # attributes, then 8 class logits (task 1), then 2 gender logits
        raise HeadConfigError(f"n_outputs must be at least 1, got {n_outputs}")
    cls = FusionModel if score_set.kind == "fusion" else SingleViewModel
    return cls(
        views=tuple(score_set.views),
        dim=model_cfg.common_dim,
        hidden=model_cfg.hidden,
        dropout=model_cfg.dropout,
        n_outputs=n_outputs,
        branches=model_cfg.mlp_branches,
        param_init=model_cfg.init,
        pooling=model_cfg.pooling,
    )


__all__ = [
    "FusionModel",
    "HeadConfigError",
    "LayerSum",
    "MLPHead",
    "MLPPath",
    "SelfBalancingGate",
    "SingleViewModel",
    "ViewInput",
    "build_score_model",
    "interactive_attention",
]
