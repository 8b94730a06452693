"""DLRM (Naumov et al., 2019).

- bottom MLP: dense [B, D] -> [B, e] (ReLU after every layer, as in the reference and TorchRec),
  one extra field of the sparse field width e;
- interaction: dot products of all pairs of fields (sparse fields of emb + the dense field),
  strict upper triangle, concatenated with the dense field;
- top MLP -> 1 logit.
With D == 0 there is no bottom MLP and the top MLP sees only the pairwise dots of the sparse
fields (a multi-probe feature's k fields also dot each other, carrying per-feature signal).
The bottom MLP is plain (no batch norm, no dropout) as in the reference; `batch_norm` and
`dropout` apply to the top MLP.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from unified_embedding.models.base import CTRModel
from unified_embedding.models.layers import DEFAULT_DROPOUT, MLP, DotInteraction, check_hidden


class DLRM(CTRModel):
    def __init__(
        self,
        feature_dims: Sequence[int],
        num_dense: int,
        *,
        bottom_hidden: Sequence[int] = (512, 256, 64),
        top_hidden: Sequence[int] = (512, 256),
        dropout: float = DEFAULT_DROPOUT,
        batch_norm: bool = True,
        activation: str = "relu",
    ) -> None:
        super().__init__(feature_dims, num_dense)
        self._warn_if_narrow_fields()
        bottom_hidden = check_hidden(bottom_hidden, "bottom_hidden")
        e = self.field_dim
        if num_dense:
            # every bottom layer (the projection to e included) is followed by the activation
            self.bottom = MLP(num_dense, (*bottom_hidden, e), activation=activation)
        else:
            self.bottom = None
        total_fields = self.num_fields + (1 if num_dense else 0)
        if total_fields < 2:
            raise ValueError(
                f"DLRM needs at least 2 fields to interact; feature widths {self.feature_dims} with "
                f"num_dense={num_dense} give {total_fields}"
            )
        self.interaction = DotInteraction(total_fields)
        top_in = self.interaction.out_dim + (e if num_dense else 0)
        self.top = MLP(top_in, top_hidden, activation=activation, dropout=dropout, batch_norm=batch_norm, output_dim=1)

    def _forward(self, emb: Tensor, dense: Tensor) -> Tensor:
        fields = self.as_fields(emb)
        if self.bottom is not None:
            dense_field = self.bottom(dense)  # [B, e]
            fields = torch.cat([dense_field.unsqueeze(1), fields], dim=1)
            top_in = torch.cat([dense_field, self.interaction(fields)], dim=1)
        else:
            top_in = self.interaction(fields)
        return self.top(top_in).squeeze(1)
