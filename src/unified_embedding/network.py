"""A CTR network: an embedding method feeding a model, and nothing else.

The only place the two meet. The model is built from the method's `out_dims`, so neither
needs to know the other's type.
"""

from __future__ import annotations

from torch import Tensor, nn

from unified_embedding.batch import Batch
from unified_embedding.embeddings import EmbeddingMethod
from unified_embedding.models import build_model


class CTRNetwork(nn.Module):
    def __init__(self, embedding: EmbeddingMethod, model: nn.Module) -> None:
        super().__init__()
        self.embedding = embedding
        self.model = model

    @classmethod
    def build(cls, embedding: EmbeddingMethod, model: str, **model_options) -> CTRNetwork:
        num_dense = len(embedding.features.dense)
        return cls(embedding, build_model(model, list(embedding.out_dims.values()), num_dense, **model_options))

    def forward(self, batch: Batch) -> Tensor:
        """Logits [B]."""
        return self.model(self.embedding(batch), batch.dense)
