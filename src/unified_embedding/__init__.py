"""Unified Embedding: one hashed table for every categorical feature of a CTR model."""

from unified_embedding.batch import Batch
from unified_embedding.features import FeatureKind, FeatureSet, FeatureSpec, Pooling

__version__ = "0.2.4"

__all__ = ["Batch", "FeatureKind", "FeatureSet", "FeatureSpec", "Pooling", "__version__"]
