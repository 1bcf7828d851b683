"""The challenge baseline's regression head (`net/ser.py` EmotionRegression), for fine-tuning.

Input dropout, then `num_layers` blocks of Linear -> LayerNorm -> ReLU -> Dropout, then a Linear
to the outputs. The baseline builds it as `EmotionRegression(2 * D, 1024, 1, 3, dropout=0.5)`
on the attentive-statistics-pooled (B, 2D) vector. Parameter names mirror its state dict
(`fc.0.0` Linear, `fc.0.1` LayerNorm, `out.0` Linear) as `fc_0_0`, `fc_0_1`, `out_0`.
"""

from __future__ import annotations

import flax.linen as nn
import jax

from jax_ifmvse.heads.mlp import Linear

TORCH_LN_EPS = 1e-5  # torch.nn.LayerNorm's default (Flax's is 1e-6)


class EmotionRegression(nn.Module):
    """(B, D_in) -> (B, n_outputs): the baseline's MLP regression head."""

    hidden: int = 1024
    n_outputs: int = 3
    num_layers: int = 1
    dropout: float = 0.5
    param_init: str = "torch"

    @nn.compact
    def __call__(self, x: jax.Array, *, train: bool) -> jax.Array:
        """(B, D_in) -> (B, n_outputs); dropout only when `train`."""
        h = nn.Dropout(self.dropout, deterministic=not train, name="inp_drop")(x)
        for i in range(self.num_layers):
            h = Linear(self.hidden, self.param_init, name=f"fc_{i}_0")(h)  # (B, H)
            h = nn.LayerNorm(epsilon=TORCH_LN_EPS, name=f"fc_{i}_1")(h)
            h = nn.relu(h)
            h = nn.Dropout(self.dropout, deterministic=not train)(h)
        return Linear(self.n_outputs, self.param_init, name="out_0")(h)  # (B, n_outputs)
