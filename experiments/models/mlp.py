"""A plain flax.linen MLP: ``Dense(hidden_0) -> relu -> ... -> Dense(head)``.

Parameter paths (over the ``params`` dict) are ``hidden_0/kernel``,
``hidden_0/bias``, ``hidden_1/kernel``, ..., ``head/kernel``, ``head/bias``, so
rules like ``r".*hidden_\\d+/kernel"`` and ``r"head/.*"`` address them.
"""
from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax


class MLP(nn.Module):
    """``features -> hidden[0] -> ... -> hidden[-1] -> n_classes`` logits, ReLU in between."""
    hidden: Sequence[int] = (256, 256)
    n_classes: int = 5

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, width in enumerate(self.hidden):
            x = nn.relu(nn.Dense(width, name=f"hidden_{i}")(x))
        return nn.Dense(self.n_classes, name="head")(x)
