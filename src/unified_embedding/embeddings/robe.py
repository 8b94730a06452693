"""ROBE: Random Offset Block Embedding (Desai, Chou & Shrivastava, MLSys 2022).

All weights live in one flat, circular array M. The vector of value v of feature f is cut
into blocks of Z consecutive coordinates; block t is read from Z consecutive weights of M
starting at a hashed offset h(f, v, t), wrapping around the end of M:

    e[j] = g(f, v, t) * M[(h(f, v, t) + j mod Z) mod |M|],   t = floor(j / Z)

Z = 1 is exactly HashedNet (one hash and one sign per coordinate); the paper argues that larger blocks
improve both cache behaviour (one contiguous read per block) and the variance of the hashed
estimate. The default Z = 32 therefore takes whole vectors as one block for the usual
widths (<= 32): each vector then sits at a random, unaligned offset, so unlike the hashing
trick's aligned rows two values' vectors may overlap in part. `signed` multiplies each block
by a random sign g(f, v, t), as ROBE implementations do to make collisions unbiased.

The paper puts every feature (embedding table) in one array: that is `shared=True` here;
the default `shared=False` gives each feature a circular array of its own, sized by
cardinality like `hashing`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from unified_embedding.embeddings.base import register
from unified_embedding.embeddings.hash_family import (
    DEFAULT_DIM,
    FlatArrayEmbedding,
    Layout,
    feature_widths,
    region_sizes,
)
from unified_embedding.features import FeatureSet

#: Block size Z; a vector of width <= 32 is one block.
DEFAULT_BLOCK_SIZE = 32


@register
class RobeEmbedding(FlatArrayEmbedding):
    """A circular array of `size` weights per feature (or one shared array) read in blocks of Z."""

    name = "robe"
    description = "ROBE-Z: vectors made of blocks of Z consecutive weights at hashed offsets of a circular array"
    paper = (
        "Desai, Chou & Shrivastava, Random Offset Block Embedding (ROBE) for compressed embedding tables "
        "in deep learning recommendation systems, MLSys 2022"
    )

    def __init__(
        self,
        features: FeatureSet,
        size: int | Mapping[str, int],
        dim: int = DEFAULT_DIM,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        shared: bool = False,
        signed: bool = True,
        **options,
    ) -> None:
        if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
            raise ValueError(f"block_size must be a positive integer, got {block_size!r}")
        widths = feature_widths(features, dim)
        sizes = region_sizes(features, size, shared, "the ROBE array's size")
        layout = Layout(features, 1)
        shared_base = layout.region(next(iter(sizes.values()))) if shared else 0
        for name, width in widths.items():
            base = shared_base if shared else layout.region(sizes[name])
            blocks = [layout.probe(name, sizes[name], "robe", t) for t in range(math.ceil(width / block_size))]
            for j in range(width):
                layout.read(0, blocks[j // block_size], base, 1, j % block_size)
        super().__init__(features, layout, 1, **options)
        self.block_size, self.shared, self.signed = block_size, shared, signed
        self.sizes = sizes

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, Z={self.block_size}, shared={self.shared}, signed={self.signed}"
