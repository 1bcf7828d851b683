"""Multi-View Feature Interaction Fusion (paper section 2.2): DIA (eq. 2-4) and MSBG (eq. 5-6).

Submodule names follow the paper's symbols: `W1p`, `W2p`, `Wzp`, `W1q`, `W2q`, `Wzq` are `Linear`
layers (weight (out, in) and bias, as `nn.Linear` in the GBAN code the paper builds on) of width
`dim`.
"""

from __future__ import annotations

from collections.abc import Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp

from jax_ifmvse.heads.mlp import Linear, MLPHead
from jax_ifmvse.heads.pooling import AttentiveStatisticsPooling

POOLINGS = ("mean", "attentive")  # `model.pooling`: stored pooled vectors, or frames pooled here


def view_mask(features: Mapping[str, jax.Array], view: str) -> jax.Array | None:
    """The (B, T) frame mask of a frame view (key `<view>:mask`), None for pooled views."""
    return features.get(f"{view}:mask")


class LayerSum(nn.Module):
    """Learnable softmax-weighted sum over a backbone's stored layers (s3prl's weighted sum)."""

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        """(B, L, D) -> (B, D)."""
        # Zeros start as the plain layer average, as s3prl initialises its weights.
        w = self.param("layer_weights", nn.initializers.zeros, (x.shape[1],), jnp.float32)
        return jnp.einsum("l,bld->bd", jax.nn.softmax(w), x)


class ViewInput(nn.Module):
    """A view's input: attentive statistics pooling of frames (`pooling="attentive"`) or an
    optional layer sum, then a linear map to `dim` when its width differs."""

    dim: int
    param_init: str = "torch"
    pooling: str = "mean"

    @nn.compact
    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        """(B, D), (B, L, D) or frames (B, T, D) with mask (B, T) -> (B, dim)."""
        if self.pooling == "attentive":
            # Padded frames are masked out of the attention softmax and the statistics.
            x = AttentiveStatisticsPooling(self.param_init, name="pool")(x, mask)  # (B, 2D)
        elif x.ndim == 3:
            x = LayerSum(name="layer_sum")(x)
        if x.shape[-1] != self.dim:
            # e.g. Whisper-large-v3's 1280 -> 1024 so that eq. 2's Hadamard product is defined.
            x = Linear(self.dim, self.param_init, name="proj")(x)
        return x  # (B, dim)


def interactive_attention(f1: jax.Array, f2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Dual-Feature Interactive Attention, eq. 2-4: returns (F1_hat, F2_hat)."""
    f_inter = f1 * f2  # eq. 2, (B, d)
    alpha = jax.nn.sigmoid(jnp.tanh(f_inter))  # eq. 3
    # Eq. 4 writes alpha_1 and alpha_2, but eq. 3 defines a single alpha: both views share it.
    return alpha * f1, alpha * f2


class SelfBalancingGate(nn.Module):
    """Multi-View Self-Balancing Gate, eq. 5-6: fuses (F1, F2, F1_hat, F2_hat) into S."""

    dim: int
    param_init: str = "torch"

    @nn.compact
    def __call__(self, f1, f2, f1_hat, f2_hat) -> jax.Array:
        """Four (B, d) arrays -> S (B, dim)."""
        lin = {
            n: Linear(self.dim, self.param_init, name=n)
            for n in ("W1p", "W2p", "Wzp", "W1q", "W2q", "Wzq")
        }
        p1 = jnp.tanh(lin["W1p"](f1))
        p2 = jnp.tanh(lin["W2p"](f2))
        z_p = jax.nn.sigmoid(lin["Wzp"](jnp.concatenate([f1, f2], -1)))
        q1 = jnp.tanh(lin["W1q"](f1_hat))
        q2 = jnp.tanh(lin["W2q"](f2_hat))
        z_q = jax.nn.sigmoid(lin["Wzq"](jnp.concatenate([f1_hat, f2_hat], -1)))
        return z_p * p1 + (1 - z_p) * p2 + z_q * q1 + (1 - z_q) * q2  # eq. 6


class FusionModel(nn.Module):
    """Score set of kind `fusion`: two views -> DIA -> MSBG -> MLP head -> (B, n_outputs)."""

    views: tuple[str, str] = ("view1", "view2")  # feature keys of F1 and F2
    dim: int = 1024
    hidden: int = 512
    dropout: float = 0.5
    n_outputs: int = 1
    branches: int = 1
    param_init: str = "torch"  # torch | flax (`model.init`): see `Linear`
    pooling: str = "mean"  # mean | attentive (`model.pooling`): see `ViewInput`

    @nn.compact
    def __call__(self, features: Mapping[str, jax.Array], *, train: bool) -> jax.Array:
        """{view: (B, D) or (B, L, D), or frames (B, T, D) with `<view>:mask`} -> (B, n_outputs)."""
        v1, v2 = self.views[0], self.views[1]
        f1 = ViewInput(self.dim, self.param_init, self.pooling, name="view1")(
            features[v1], view_mask(features, v1)
        )  # (B, dim)
        f2 = ViewInput(self.dim, self.param_init, self.pooling, name="view2")(
            features[v2], view_mask(features, v2)
        )
        f1_hat, f2_hat = interactive_attention(f1, f2)
        s = SelfBalancingGate(self.dim, self.param_init, name="gate")(
            f1, f2, f1_hat, f2_hat
        )  # (B, dim)
        mlp = MLPHead(
            self.hidden, self.dropout, self.n_outputs, self.branches, self.param_init, name="mlp"
        )
        return mlp(s, train=train)


class SingleViewModel(nn.Module):
    """Score set of kind `mlp`: one view (mapped to `dim` if needed) -> MLP head."""

    views: tuple[str, ...] = ("view1",)
    dim: int = 1024
    hidden: int = 512
    dropout: float = 0.5
    n_outputs: int = 1
    branches: int = 1
    param_init: str = "torch"  # torch | flax (`model.init`): see `Linear`
    pooling: str = "mean"  # mean | attentive (`model.pooling`): see `ViewInput`

    @nn.compact
    def __call__(self, features: Mapping[str, jax.Array], *, train: bool) -> jax.Array:
        """{view: (B, D) or (B, L, D), or frames (B, T, D) with `<view>:mask`} -> (B, n_outputs)."""
        v = self.views[0]
        f1 = ViewInput(self.dim, self.param_init, self.pooling, name="view1")(
            features[v], view_mask(features, v)
        )  # (B, dim)
        mlp = MLPHead(
            self.hidden, self.dropout, self.n_outputs, self.branches, self.param_init, name="mlp"
        )
        return mlp(f1, train=train)
