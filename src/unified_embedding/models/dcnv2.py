"""DCN-V2 (Wang et al., WWW 2021): full-rank cross network plus an MLP.

x0 = concat(emb, dense); cross layers x_{l+1} = x0 * (W_l x_l + b_l) + x_l.
- "stacked" (default): logit = Linear(MLP(Cross(x0)))
- "parallel":          logit = Linear(concat(Cross(x0), MLP(x0)))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from unified_embedding.models.base import CTRModel
from unified_embedding.models.layers import DEFAULT_DROPOUT, MLP, CrossNetworkV2, xavier_linear

STRUCTURES = ("stacked", "parallel")


class DCNv2(CTRModel):
    def __init__(
        self,
        feature_dims: Sequence[int],
        num_dense: int,
        *,
        num_cross_layers: int = 3,
        structure: str = "stacked",
        hidden: Sequence[int] = (400, 400, 400),
        dropout: float = DEFAULT_DROPOUT,
        batch_norm: bool = True,
        activation: str = "relu",
    ) -> None:
        super().__init__(feature_dims, num_dense)
        if not isinstance(num_cross_layers, int) or isinstance(num_cross_layers, bool) or num_cross_layers < 0:
            raise ValueError(f"num_cross_layers must be a non-negative integer, got {num_cross_layers!r}")
        if structure not in STRUCTURES:
            raise ValueError(f"structure must be one of {STRUCTURES}, got {structure!r}")
        self.structure = structure
        self.cross = CrossNetworkV2(self.input_dim, num_cross_layers)
        self.mlp = MLP(self.input_dim, hidden, activation=activation, dropout=dropout, batch_norm=batch_norm)
        head_in = self.mlp.out_dim if structure == "stacked" else self.input_dim + self.mlp.out_dim
        self.head = xavier_linear(nn.Linear(head_in, 1))

    def _forward(self, emb: Tensor, dense: Tensor) -> Tensor:
        x0 = self.concat_inputs(emb, dense)
        if self.structure == "stacked":
            h = self.mlp(self.cross(x0))
        else:
            h = torch.cat([self.cross(x0), self.mlp(x0)], dim=1)
        return self.head(h).squeeze(1)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, structure={self.structure!r}"
