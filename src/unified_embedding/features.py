"""Feature specifications: what each input column is and how an embedding should treat it.

Every parameter a user can get wrong about a feature is checked here, once, so that the
embedding methods, models and readers can trust a `FeatureSet` without re-validating it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from enum import Enum


class FeatureKind(str, Enum):
    """How many values an example carries for a feature, and whether they are ids."""

    CATEGORICAL = "categorical"  # exactly one id per example (a missing value is its own id)
    MULTIVALENT = "multivalent"  # a list of ids per example, pooled
    DENSE = "dense"  # one float per example


class Pooling(str, Enum):
    SUM = "sum"
    MEAN = "mean"


class FeatureError(ValueError):
    """A feature specification that cannot work, naming the feature."""


@dataclass(frozen=True)
class FeatureSpec:
    """One input feature.

    `cardinality` is the number of distinct values seen in the training split; readers fill
    it in and methods that size tables by it (hashing, frequency rules) read it.
    `probes` (Unified Embedding) and `dim` (per-feature tables) override a method's default
    width for this feature. `collisionless` asks Unified Embedding to give this feature a
    small exact table of its own instead of probing the shared one (the paper did this for
    features such as gender, where a collision would cost a lot and an exact table is tiny).
    """

    name: str
    kind: FeatureKind = FeatureKind.CATEGORICAL
    pooling: Pooling = Pooling.SUM
    cardinality: int | None = None
    probes: int | None = None
    dim: int | None = None
    collisionless: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "kind", _enum(FeatureKind, self.kind, self.name, "kind"))
        object.__setattr__(self, "pooling", _enum(Pooling, self.pooling, self.name, "pooling"))
        if not isinstance(self.name, str) or not self.name or self.name != self.name.strip():
            raise FeatureError(f"feature name {self.name!r} must be a non-empty string without surrounding spaces")
        for field in ("cardinality", "probes", "dim"):
            value = getattr(self, field)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int):
                raise FeatureError(f"feature {self.name!r}: {field} must be an integer, got {value!r}")
            minimum = 0 if field == "cardinality" else 1
            if value < minimum:
                raise FeatureError(f"feature {self.name!r}: {field} must be >= {minimum}, got {value}")
        if self.kind is FeatureKind.DENSE and (self.probes or self.dim or self.collisionless):
            raise FeatureError(
                f"feature {self.name!r} is dense: probes, dim and collisionless apply to id features only"
            )
        if self.kind is not FeatureKind.MULTIVALENT and self.pooling is not Pooling.SUM:
            raise FeatureError(f"feature {self.name!r}: pooling applies to multivalent features only")

    @property
    def is_sparse(self) -> bool:
        return self.kind is not FeatureKind.DENSE


def _enum(enum_type: type[Enum], value: object, name: str, field: str) -> Enum:
    try:
        return enum_type(value)
    except ValueError:
        allowed = ", ".join(member.value for member in enum_type)
        raise FeatureError(f"feature {name!r}: {field} must be one of {allowed}, got {value!r}") from None


class FeatureSet(Sequence[FeatureSpec]):
    """An ordered, name-unique collection of features.

    The order of `sparse` is the order of keys in every `Batch` and of the slices in every
    embedding output, so it is fixed here and nowhere else.
    """

    def __init__(self, features: Iterable[FeatureSpec]) -> None:
        self._features = tuple(features)
        seen: set[str] = set()
        for feature in self._features:
            if not isinstance(feature, FeatureSpec):
                raise FeatureError(f"expected FeatureSpec, got {type(feature).__name__}")
            if feature.name in seen:
                raise FeatureError(f"feature {feature.name!r} is defined twice")
            seen.add(feature.name)
        if not self.sparse:
            raise FeatureError("a FeatureSet needs at least one categorical or multivalent feature")

    def __getitem__(self, index):  # type: ignore[override]
        return self._features[index]

    def __len__(self) -> int:
        return len(self._features)

    def __iter__(self) -> Iterator[FeatureSpec]:
        return iter(self._features)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, FeatureSet) and self._features == other._features

    def __repr__(self) -> str:
        return f"FeatureSet({list(self._features)!r})"

    @property
    def sparse(self) -> tuple[FeatureSpec, ...]:
        return tuple(f for f in self._features if f.is_sparse)

    @property
    def dense(self) -> tuple[FeatureSpec, ...]:
        return tuple(f for f in self._features if not f.is_sparse)

    @property
    def sparse_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.sparse)

    @property
    def dense_names(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.dense)

    def get(self, name: str) -> FeatureSpec:
        for feature in self._features:
            if feature.name == name:
                return feature
        raise FeatureError(f"no feature named {name!r}; known: {', '.join(f.name for f in self._features)}")

    def with_cardinalities(self, cardinalities: Mapping[str, int]) -> FeatureSet:
        """A copy with training-split cardinalities filled in."""
        unknown = set(cardinalities) - set(self.sparse_names)
        if unknown:
            raise FeatureError(f"cardinalities given for unknown features: {sorted(unknown)}")
        return FeatureSet(
            replace(f, cardinality=int(cardinalities[f.name])) if f.name in cardinalities else f for f in self._features
        )

    def to_config(self) -> list[dict]:
        """JSON-able form, stored in run.json and checkpoints."""
        out = []
        for f in self._features:
            item: dict = {"name": f.name, "kind": f.kind.value}
            if f.kind is FeatureKind.MULTIVALENT:
                item["pooling"] = f.pooling.value
            for field in ("cardinality", "probes", "dim"):
                if getattr(f, field) is not None:
                    item[field] = getattr(f, field)
            if f.collisionless:
                item["collisionless"] = True
            out.append(item)
        return out

    @classmethod
    def from_config(cls, config: Sequence[Mapping]) -> FeatureSet:
        return cls(FeatureSpec(**dict(item)) for item in config)
