"""Embedding methods behind one interface; `METHODS` maps registry names to classes."""

from unified_embedding.embeddings.base import (
    METHODS,
    BudgetError,
    EmbeddingMethod,
    build_embedding,
    get_method,
    register,
)
from unified_embedding.embeddings.full import FullEmbedding
from unified_embedding.embeddings.hashed import HashingTrickEmbedding
from unified_embedding.embeddings.unified import MultiplexedEmbedding, UnifiedEmbedding

__all__ = [
    "METHODS",
    "BudgetError",
    "EmbeddingMethod",
    "FullEmbedding",
    "HashingTrickEmbedding",
    "MultiplexedEmbedding",
    "UnifiedEmbedding",
    "build_embedding",
    "get_method",
    "register",
]
