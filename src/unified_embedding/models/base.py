"""The model side of the embedding/model seam.

A CTR model receives
- `emb`   [B, W] float: the concatenation of every sparse feature's vector, as produced by an
  embedding method; feature i occupies a contiguous slice of width `feature_dims[i]`, and the
  widths may differ between features (Unified Embedding gives feature f k_f * d columns);
- `dense` [B, D] float: the dense features (D may be 0),
and returns logits [B] (no sigmoid). It never knows which embedding method made `emb`.

Interaction models (FM, DeepFM, DLRM) need *fields*: vectors of one common width that can be
dotted with each other. We take the common width e = gcd(feature_dims) and view emb as
[B, W // e, e], a free reshape of the contiguous concatenation: a feature of width k * e
contributes k consecutive fields. This is exactly Unified Embedding's structure: a multi-probe
feature with k_f probes is the concatenation of k_f rows of width d of the shared table, so it
becomes k_f fields of width d (each an independent hashed lookup, each interacting with every
other field), and single-probe features with width d are one field each, as in a classical FM.
When every feature has the same width, e is that width and fields are features.
"""

from __future__ import annotations

import abc
import warnings
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from unified_embedding.models.layers import gcd_width, xavier_linear


class CTRModel(nn.Module, abc.ABC):
    """Base class of every CTR backbone: `forward(emb [B, W], dense [B, D]) -> logits [B]`.

    Subclasses implement `_forward`; `forward` validates shapes first so that a mismatch between
    the embedding method and the model fails with a message naming both widths.
    """

    #: L2 on the embedding's per-id rows that training uses unless told otherwise. Chosen on
    #: validation splits per kind of model. Deep backbones gain from 1e-2 over none: DCNv2 on
    #: MovieLens-100K (full 1x 0.7918 -> 0.8026; unified 0.25x 0.7896 -> 0.7901), Frappe (unified
    #: 0.25x 0.9535 -> 0.9575) and the Criteo sample (0.7472 -> 0.7500), 1e-3..1e-1 tried. Models
    #: linear in the embedding (LR, FM) set a smaller value, since there the rows are the whole
    #: model (docs/methods.md, "Embedding weight decay per model").
    embedding_weight_decay: float = 1e-2

    def __init__(self, feature_dims: Sequence[int], num_dense: int) -> None:
        super().__init__()
        dims = tuple(feature_dims)
        if len(dims) == 0:
            raise ValueError("feature_dims must name at least one sparse feature width")
        if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims):
            raise ValueError(f"feature_dims must be positive integers, got {feature_dims!r}")
        if not isinstance(num_dense, int) or isinstance(num_dense, bool) or num_dense < 0:
            raise ValueError(f"num_dense must be a non-negative integer, got {num_dense!r}")
        self.feature_dims: tuple[int, ...] = dims
        self.num_dense: int = num_dense

    # ----------------------------------------------------------------- layout
    @property
    def emb_dim(self) -> int:
        """W: total width of the concatenated sparse embedding."""
        return sum(self.feature_dims)

    @property
    def input_dim(self) -> int:
        """W + D: width of concat(emb, dense), the input of the MLP/linear/cross parts."""
        return self.emb_dim + self.num_dense

    @property
    def field_dim(self) -> int:
        """e = gcd(feature_dims): the common field width used by interaction models."""
        return gcd_width(self.feature_dims)

    @property
    def num_fields(self) -> int:
        """Number of sparse fields W // e (a feature of width k * e counts k times)."""
        return self.emb_dim // self.field_dim

    def as_fields(self, emb: Tensor) -> Tensor:
        """View emb [B, W] as fields [B, W // e, e] (no copy when emb is contiguous)."""
        return emb.reshape(emb.shape[0], self.num_fields, self.field_dim)

    def _warn_if_narrow_fields(self) -> None:
        """Interaction models call this: coprime widths collapse fields to width 1."""
        if self.field_dim == 1 and len(self.feature_dims) > 1:
            warnings.warn(
                f"{type(self).__name__}: feature widths {self.feature_dims} have gcd 1, so interactions run over "
                f"{self.num_fields} scalar fields; choose widths with a common factor (e.g. multiples of the "
                f"chunk width d) for meaningful field interactions",
                stacklevel=3,
            )

    # ------------------------------------------------------------------ forward
    def forward(self, emb: Tensor, dense: Tensor | None = None) -> Tensor:
        """Logits [B] for emb [B, W] and dense [B, D]; `dense` may be None when D == 0."""
        if emb.dim() != 2 or emb.shape[1] != self.emb_dim:
            raise ValueError(
                f"{type(self).__name__} expects emb [B, {self.emb_dim}] (feature widths {self.feature_dims}), "
                f"got {tuple(emb.shape)}"
            )
        if dense is None:
            if self.num_dense:
                raise ValueError(f"{type(self).__name__} expects dense [B, {self.num_dense}], got None")
            dense = emb.new_zeros(emb.shape[0], 0)
        elif dense.dim() != 2 or dense.shape != (emb.shape[0], self.num_dense):
            raise ValueError(
                f"{type(self).__name__} expects dense [{emb.shape[0]}, {self.num_dense}], got {tuple(dense.shape)}"
            )
        return self._forward(emb, dense.to(emb.dtype))

    @abc.abstractmethod
    def _forward(self, emb: Tensor, dense: Tensor) -> Tensor:
        """Compute logits [B] from validated emb [B, W] and dense [B, D]."""

    def concat_inputs(self, emb: Tensor, dense: Tensor) -> Tensor:
        """concat(emb, dense) [B, W + D]."""
        return torch.cat([emb, dense], dim=1) if self.num_dense else emb

    def num_parameters(self) -> int:
        """Number of trainable floats in the model (excludes the embedding method)."""
        return sum(p.numel() for p in self.parameters())

    def extra_repr(self) -> str:
        return f"feature_dims={self.feature_dims}, num_dense={self.num_dense}"


class DenseField(nn.Module):
    """Project dense features [B, D] to one extra field [B, 1, e] with a linear layer.

    With `bias=False` this is FM's treatment of real-valued features collapsed into one field:
    sum_j x_j v_j, where v_j (column j of the weight) is dense feature j's factor vector.
    """

    def __init__(self, num_dense: int, field_dim: int, bias: bool = False) -> None:
        super().__init__()
        self.linear = xavier_linear(nn.Linear(num_dense, field_dim, bias=bias))

    def forward(self, dense: Tensor) -> Tensor:
        return self.linear(dense).unsqueeze(1)
