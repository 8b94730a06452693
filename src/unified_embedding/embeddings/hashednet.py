"""HashedNets for embeddings (Chen et al., ICML 2015): every coordinate hashed into a flat array.

Coordinate j of the vector of value v of feature f is xi(f, v, j) * w[h(f, v, j)], where w is
a flat array of weights and xi a random sign (`signed=True`, as in the paper, makes the
collisions unbiased in inner products). Each coordinate is hashed on its own, so no two
values share a whole vector; the price is d hashes and d scattered reads per value.
"""

from __future__ import annotations

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


@register
class HashedNetEmbedding(FlatArrayEmbedding):
    """A flat array of `size` weights per feature (or one shared array); one hash per coordinate.

    `size` is an int (every feature's array, or the shared array) or a mapping of feature to
    its array's size. With `shared=True` every feature reads the one array, told apart by
    per-feature salts.
    """

    name = "hashednet"
    description = "HashedNet: every (feature, value, coordinate) hashed into a flat weight array, with a sign hash"
    paper = "Chen et al., Compressing Neural Networks with the Hashing Trick, ICML 2015"

    def __init__(
        self,
        features: FeatureSet,
        size: int | Mapping[str, int],
        dim: int = DEFAULT_DIM,
        *,
        shared: bool = False,
        signed: bool = True,
        **options,
    ) -> None:
        widths = feature_widths(features, dim)
        sizes = region_sizes(features, size, shared, "the weight array's size")
        layout = Layout(features, 1)
        shared_base = layout.region(next(iter(sizes.values()))) if shared else 0
        for name, width in widths.items():
            base = shared_base if shared else layout.region(sizes[name])
            for j in range(width):
                layout.read(0, layout.probe(name, sizes[name], "hashednet", j), base)
        super().__init__(features, layout, 1, **options)
        self.shared, self.signed = shared, signed
        self.sizes = sizes

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shared={self.shared}, signed={self.signed}"
