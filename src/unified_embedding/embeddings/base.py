"""The interface every embedding method implements, and the registry the CLI and lab use.

A method turns a `Batch`'s sparse ids into one [B, W] tensor: the concatenation, in the
feature set's order, of each sparse feature's vector. It never sees the model; a model
sees only the widths in `out_dims`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from typing import Any, ClassVar, Self

import numpy as np
import torch
from torch import Tensor, nn

from unified_embedding.batch import Batch
from unified_embedding.features import FeatureSet
from unified_embedding.fused import RowOptimizer

Vocabularies = Mapping[str, np.ndarray | Tensor]


class BudgetError(ValueError):
    """A parameter budget that a method cannot meet; says what the smallest instance costs."""


class EmbeddingMethod(nn.Module, ABC):
    """Base class: sparse ids of a `Batch` -> [B, sum(out_dims)] floats."""

    #: registry name, e.g. "unified"
    name: ClassVar[str]
    #: one line for `ue methods`, and the paper it comes from
    description: ClassVar[str]
    paper: ClassVar[str] = ""
    #: True when the method's tables produce sparse gradients (the trainer then picks sparse optimizers)
    sparse: bool = False
    #: why the method refuses sparse gradients (weights beside its tables need dense ones, which
    #: SparseAdam cannot train); "" when it takes them. `require_dense` reads it.
    dense_only_because: ClassVar[str] = ""
    #: True when `from_budget` takes `frequent_ids` (each feature's training ids, most frequent
    #: first), which the trainer then computes and passes
    uses_id_frequencies: ClassVar[bool] = False
    #: True when training may add rows to a parameter (a growing vocabulary); the trainer's
    #: optimizers then pad their state to follow
    grows: bool = False

    def __init__(self, features: FeatureSet) -> None:
        super().__init__()
        self.features = features

    @property
    @abstractmethod
    def out_dims(self) -> dict[str, int]:
        """Width of each sparse feature's vector, in feature order."""

    @property
    def output_dim(self) -> int:
        return sum(self.out_dims.values())

    def feature_slices(self) -> dict[str, slice]:
        """Where each feature's vector sits in the output's columns."""
        slices, start = {}, 0
        for name, width in self.out_dims.items():
            slices[name] = slice(start, start + width)
            start += width
        return slices

    @abstractmethod
    def forward(self, batch: Batch) -> Tensor:
        """[B, output_dim] embedding of the batch's sparse features."""

    def num_parameters(self) -> int:
        """Every stored float of the method: tables, hash weights, networks."""
        return sum(p.numel() for p in self.parameters())

    def num_bytes(self) -> int:
        """Bytes a deployment stores for the method (float32 unless the method stores less)."""
        return 4 * self.num_parameters()

    def decayed_parameters(self) -> list[nn.Parameter]:
        """The parameters the trainer's embedding weight decay regularises: per-id rows (tables,
        pools, cores), which memorise rare ids, and not the networks, projections or learned
        thresholds a method may also have (L2 on DHE's decoder cost it 0.06 AUC on Frappe).
        """
        return list(self.parameters())

    def fuse_optimizer(self, kind: str, lr: float, **options) -> list[RowOptimizer]:
        """Move the update of the method's tables into its backward pass (fused.py).

        Returns the row optimizers now owning those tables; the caller's torch optimizer must
        leave their tables alone. Only methods that read one plain table support it.
        """
        raise ValueError(f"method {self.name!r} has no table the fused update can own")

    def extra_loss(self) -> Tensor | None:
        """A method's own training loss term (a sparsity penalty, say), added by the trainer."""
        return None

    #: The method's training stages, in order. Each runs to early stopping on validation AUC
    #: with fresh optimizer state; a search-then-retrain method names two or three.
    stages: ClassVar[tuple[str, ...]] = ("train",)

    def begin_stage(self, stage: str, validation_auc: Callable[[], float]) -> dict[str, Any]:
        """Turn the previous stage's best weights into the start of `stage` (prune rows, fix the
        widths a search found, re-initialise what is retrained).

        Called for every stage after the first. `validation_auc()` scores the whole network,
        as it stands, on the validation split, for searches that need it. Whatever the next
        stage depends on must live in parameters or buffers, so a checkpoint restores it.
        Returns what run.json records of the transition (found widths, pruned row counts).
        """
        raise NotImplementedError(f"method {self.name!r} declares stages {self.stages} but no begin_stage")

    def after_step(self) -> None:
        """Called after every optimizer step: schedules that act between steps (gradual pruning
        to a target sparsity, re-assigning rows as the data moves)."""

    @classmethod
    @abstractmethod
    def from_budget(
        cls, features: FeatureSet, budget: int, *, vocabularies: Vocabularies | None = None, **options
    ) -> Self:
        """The largest instance whose `num_parameters()` is at most `budget`.

        Raises `BudgetError` when even the smallest instance does not fit.
        """

    def extra_repr(self) -> str:
        return f"features={len(self.features.sparse)}, output_dim={self.output_dim}, params={self.num_parameters():,}"


METHODS: dict[str, type[EmbeddingMethod]] = {}


def require_one_width(
    features: FeatureSet, why: str, error: type[ValueError] = BudgetError, *, dim: int | None = None
) -> None:
    """Refuse per-feature widths (other than `dim`) for a method that gives every feature one width.

    `from_budget` raises `BudgetError` (a sweep records the run as refused); constructors
    raise a plain `ValueError`.
    """
    other = [f.name for f in features.sparse if f.dim not in (None, dim)]
    if other:
        raise error(f"{why}; features {other} ask for widths of their own: remove their per-feature dims")


def require_dense(method: EmbeddingMethod, sparse: bool) -> None:
    """Refuse `sparse=True` for a method that declares `dense_only_because`, saying why by name."""
    if sparse and method.dense_only_because:
        raise ValueError(f"{method.name} {method.dense_only_because}; use sparse=False (drop --sparse)")


def register(cls: type[EmbeddingMethod]) -> type[EmbeddingMethod]:
    """Class decorator adding a method to `METHODS` under its `name`."""
    if cls.name in METHODS:
        raise ValueError(f"embedding method {cls.name!r} is registered twice")
    METHODS[cls.name] = cls
    return cls


def get_method(name: str) -> type[EmbeddingMethod]:
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown embedding method {name!r}; known: {', '.join(sorted(METHODS))}") from None


def build_embedding(
    name: str, features: FeatureSet, budget: int, *, vocabularies: Vocabularies | None = None, **options
) -> EmbeddingMethod:
    """The registered method `name` at the largest size within `budget` parameters."""
    if isinstance(budget, bool) or not isinstance(budget, (int, np.integer)) or budget < 1:
        raise BudgetError(f"budget must be a positive number of parameters, got {budget!r}")
    return get_method(name).from_budget(features, int(budget), vocabularies=vocabularies, **options)


def uniform_init(weight: Tensor, scale: float) -> None:
    """Uniform(-scale, scale): small enough that the first MLP layer starts near-linear."""
    with torch.no_grad():
        weight.uniform_(-scale, scale)


def as_tensor(ids: np.ndarray | Tensor) -> Tensor:
    return ids if isinstance(ids, Tensor) else torch.from_numpy(np.ascontiguousarray(ids, dtype=np.int64))


def resolve_budget(budget: str | int, reference: int) -> int:
    """Parameters for a budget given as a count ("250000", "2.5e5") or a multiple ("0.25x") of `reference`.

    `reference` is the size of the collisionless `full` method on the same data, so "0.25x"
    means a quarter of the uncompressed model's embedding parameters.
    """
    text = str(budget).strip().lower()
    try:
        value = float(text[:-1]) * reference if text.endswith("x") else float(text)
    except ValueError:
        raise BudgetError(
            f"budget must be a parameter count like 250000 or a multiple like 0.25x, got {budget!r}"
        ) from None
    if not 1 <= value < float("inf"):  # also refuses NaN
        raise BudgetError(f"budget {budget!r} is {value:g} parameters; it must be at least 1")
    return int(value)
