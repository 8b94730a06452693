"""Embedding methods behind one interface; `METHODS` maps registry names to classes.

Every module of this package that defines a method registers it with `@register` on import;
importing them all here means a new method is one new file, with no list to edit.
"""

import importlib
import pkgutil

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

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

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
