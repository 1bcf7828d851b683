"""Per-view MLP head (paper section 3.2): 1024 -> 512 -> 1, ReLU and dropout 0.5 in the hidden layer.

Reading of the paper's ambiguous sentence "we adopt a dual-branch structure. Each large-model-encoded
speech feature traverses two identical MLP paths": the plain reading, the default
(`ModelConfig.mlp_branches=1`), is that the "two paths" are the two views of a fusion model
(F1 and F2 each go through their own tanh projection in the gate) followed by one MLP
(1024, 512, 1) on the fused vector S, and a single-view score set is one MLP on its view. The
alternative literal reading, `mlp_branches=2`, runs every MLP as two identical (same shape,
separately initialised) paths on the same input and averages their outputs, like a two-member
ensemble inside the model.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class MLPPath(nn.Module):
    """One MLP path: Dense `fc1` -> ReLU -> Dropout -> Dense `fc2`."""

    hidden: int = 512
    dropout: float = 0.5
    n_outputs: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """(B, D) -> (B, n_outputs)."""
        h = nn.relu(nn.Dense(self.hidden, name="fc1")(x))  # (B, H)
        h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return nn.Dense(self.n_outputs, name="fc2")(h)  # (B, n_outputs)


class MLPHead(nn.Module):
    """The score MLP: one path, or `branches` identical paths whose outputs are averaged."""

    hidden: int = 512
    dropout: float = 0.5
    n_outputs: int = 1
    branches: int = 1

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """(B, D) -> (B, n_outputs)."""
        if self.branches == 1:
            return MLPPath(self.hidden, self.dropout, self.n_outputs, name="path0")(x, train=train)
        outs = [
            MLPPath(self.hidden, self.dropout, self.n_outputs, name=f"path{i}")(x, train=train)
            for i in range(self.branches)
        ]
        return jnp.mean(jnp.stack(outs), axis=0)
