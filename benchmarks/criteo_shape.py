"""Criteo-shaped synthetic ids for speed benchmarks (speed only: never a quality claim).

26 categorical features with the per-feature cardinalities of the Criteo Kaggle training
set (as counted by the DLRM reference preprocessing), ids Zipf-distributed within each
feature like real click logs, and 13 dense features.
"""

from __future__ import annotations

import numpy as np
import torch

from unified_embedding.batch import Batch
from unified_embedding.features import FeatureKind, FeatureSet, FeatureSpec

CRITEO_CARDINALITIES = (
    1460, 583, 10131227, 2202608, 305, 24, 12517, 633, 3, 93145, 5683, 8351593, 3194,
    27, 14992, 5461306, 10, 5652, 2173, 4, 7046547, 18, 15, 286181, 105, 142572,
)  # fmt: skip
NUM_DENSE = 13
ZIPF_EXPONENT = 1.05


def criteo_features() -> FeatureSet:
    sparse = [FeatureSpec(f"C{i + 1}", cardinality=c) for i, c in enumerate(CRITEO_CARDINALITIES)]
    dense = [FeatureSpec(f"I{i + 1}", FeatureKind.DENSE) for i in range(NUM_DENSE)]
    return FeatureSet(dense + sparse)


def criteo_batch(batch_size: int, rng: np.random.Generator) -> Batch:
    """One batch of Zipf ids (rank r of a feature is id (r * a large odd number) mod cardinality)."""
    ids = {}
    for i, cardinality in enumerate(CRITEO_CARDINALITIES):
        rank = rng.zipf(ZIPF_EXPONENT, batch_size) - 1
        ids[f"C{i + 1}"] = torch.from_numpy((rank * 2654435761 + i) % cardinality)
    dense = torch.from_numpy(rng.lognormal(0, 1, (batch_size, NUM_DENSE)).astype(np.float32))
    labels = torch.from_numpy((rng.random(batch_size) < 0.25).astype(np.float32))
    return Batch.from_ids(ids, dense=dense, labels=labels)
