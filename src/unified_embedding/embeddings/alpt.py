"""ALPT, adaptive low-precision training (Li et al., "Adaptive Low-Precision Training for
Embeddings in Click-Through Rate Prediction", AAAI 2023).

The table is *stored* as integer codes: row r of feature f is c_r * step, c_r in [-q, q]
(q = 127 for `bits=8`, 7 for `bits=4`), with a learned step size per feature or per row
(`granularity`). Training keeps it so: between optimizer steps the codes are the only
record of the rows, and every step

1. the forward reads w = c * step (exactly what a deployment reads);
2. the optimizer moves a float view of the rows by the gradient of w (`weight`, always
   re-set to c * step, so it carries no information of its own), and the step sizes by the
   gradient of w with respect to step (w = c * step: d w / d step = c, LSQ's gradient for
   values on the grid, Esser et al. 2020);
3. `after_step` writes the move back into the codes with *stochastic rounding*: the row's
   move in units of the old step, c + move / step_old, rounds up with probability equal to
   its fraction (so the expected code is the unrounded value, and moves smaller than a step
   still add up), clipped to [-q, q]; the rows then read c * step_new.

Step sizes are learned in log space, step = exp(s): Adam moves every parameter by about
its learning rate per step, which for a step of ~1e-3 in linear space would be a change of
100% per update; in log space it is a relative change of ~0.1%. Each step size starts at
its rows' max |w| / q (quantization.py's symmetric per-row rule at initialisation).

Counting. A deployment stores the codes at `bits` each (int4 packed two to a byte) and the
float32 step sizes; `num_bytes()` is that, `num_parameters()` the same in 32-bit words
(rounded up). The float view `weight` and the optimizer's state are training state.
`stored()` returns the int8 codes and the step sizes.

Sizing: the budget (4 * budget bytes) buys the widest `dim` whose codes and step sizes fit.
Per-feature step sizes are the default: a per-row step costs 4 bytes per value, as much as
eight int4 columns, and the budget buys width instead.
"""

from __future__ import annotations

import math
from typing import Literal, Self

import torch
from torch import Tensor, nn

from unified_embedding.embeddings.base import BudgetError, Vocabularies, register, uniform_init
from unified_embedding.embeddings.full import vocabulary_sizes
from unified_embedding.embeddings.per_id import PerIdEmbedding
from unified_embedding.embeddings.quantization import SCALE_BYTES, largest_code, quantize_rows
from unified_embedding.embeddings.table import DEFAULT_INIT_SCALE
from unified_embedding.features import FeatureSet

Granularity = Literal["feature", "row"]
BIT_WIDTHS = {8: "int8", 4: "int4"}
DEFAULT_BITS = 4


def alpt_bytes(ids: int, dim: int, bits: int, steps: int) -> int:
    """Codes of `ids` rows of `dim` values at `bits` each (packed over the table) plus float32 steps."""
    return math.ceil(ids * dim * bits / 8) + SCALE_BYTES * steps


def stochastic_round(x: Tensor) -> Tensor:
    """floor(x) + 1 with probability frac(x): unbiased, E[round(x)] = x."""
    return torch.floor(x + torch.rand_like(x))


@register
class ALPTEmbedding(PerIdEmbedding):
    """Collisionless int8/int4 codes with learned step sizes, trained with stochastic rounding."""

    name = "alpt"
    description = "low-precision (int8/int4) embeddings trained with learned step sizes and stochastic rounding"
    paper = "Li et al., Adaptive Low-Precision Training for Embeddings in Click-Through Rate Prediction, AAAI 2023"

    def __init__(
        self,
        features: FeatureSet,
        vocabularies: Vocabularies,
        dim: int,
        *,
        bits: int = DEFAULT_BITS,
        granularity: Granularity = "feature",
        init_scale: float = DEFAULT_INIT_SCALE,
        sparse: bool = False,
    ) -> None:
        super().__init__(features, vocabularies, dim, sparse=sparse)
        if bits not in BIT_WIDTHS:
            raise ValueError(f"bits must be 8 or 4, got {bits!r}")
        if granularity not in ("feature", "row"):
            raise ValueError(f"granularity must be 'feature' or 'row', got {granularity!r}")
        self.bits, self.granularity = bits, granularity
        self.q = largest_code(BIT_WIDTHS[bits])
        initial = torch.empty(self.num_ids, dim)
        uniform_init(initial, init_scale)
        # Rows of one feature share the scale of the feature's first row (quantize_rows' groups).
        groups = self.index_offset[self.id_feature] if granularity == "feature" else None
        codes, scales = quantize_rows(initial, BIT_WIDTHS[bits], groups)
        if granularity == "feature":
            scales = scales[self.index_offset]
        # The stored table: persistent, so checkpoints and the best epoch's weights carry it.
        self.register_buffer("codes", codes)
        self.log_step = nn.Parameter(scales.log())
        self.register_buffer("applied_log_step", self.log_step.detach().clone())
        self.weight = nn.Parameter(self.dequantized())

    def step_of_rows(self, log_step: Tensor) -> Tensor:
        """[N, 1] the step size of every row."""
        steps = log_step.exp()
        return (steps[self.id_feature] if self.granularity == "feature" else steps)[:, None]

    @torch.no_grad()
    def dequantized(self) -> Tensor:
        """[N, dim] the stored rows as read: codes times step sizes."""
        return self.codes.float() * self.step_of_rows(self.log_step)

    def compose(self, index: Tensor, feature: Tensor) -> Tensor:
        ids = index + self.index_offset[feature]
        codes = self.codes[ids].float()
        steps = self.log_step.exp()[feature if self.granularity == "feature" else ids][:, None]
        read = codes * steps  # gradient to the step sizes: d w / d step = c
        rows = self.weight[ids]  # == read; carries the gradient of w to the optimizer's float view
        return read + rows - rows.detach()

    @torch.no_grad()
    def after_step(self) -> None:
        """Write the optimizer's move back into the codes by stochastic rounding (module docstring)."""
        old_steps = self.step_of_rows(self.applied_log_step)
        moved = self.weight - self.codes.float() * old_steps
        codes = stochastic_round(self.codes.float() + moved / old_steps).clamp_(-self.q, self.q)
        self.codes.copy_(codes.to(torch.int8))
        self.applied_log_step.copy_(self.log_step)
        self.weight.copy_(self.dequantized())

    def stored(self) -> tuple[Tensor, Tensor]:
        """What a deployment stores: int8 codes [N, dim] (in [-q, q]) and float32 step sizes [F] or [N]."""
        return self.codes.clone(), self.log_step.detach().exp()

    def decayed_parameters(self) -> list[nn.Parameter]:
        """The rows (decay pulls their codes towards zero), not the step sizes."""
        return [self.weight]

    def num_bytes(self) -> int:
        return alpt_bytes(self.num_ids, self.dim, self.bits, self.log_step.numel())

    def num_parameters(self) -> int:
        """32-bit words of what a deployment stores (`num_bytes`, rounded up)."""
        return math.ceil(self.num_bytes() / 4)

    @classmethod
    def from_budget(
        cls,
        features: FeatureSet,
        budget: int,
        *,
        vocabularies: Vocabularies | None = None,
        bits: int = DEFAULT_BITS,
        granularity: Granularity = "feature",
        **options,
    ) -> Self:
        """The widest `dim` whose codes and step sizes fit 4 * budget bytes."""
        ids = sum(vocabulary_sizes(features.sparse_names, vocabularies).values())
        steps = len(features.sparse) if granularity == "feature" else ids
        spare = 4 * budget - SCALE_BYTES * steps
        dim = math.floor(spare * 8 / (ids * bits)) if spare > 0 else 0
        while dim > 0 and alpt_bytes(ids, dim, bits, steps) > 4 * budget:
            dim -= 1
        if dim < 1:
            needed = math.ceil(alpt_bytes(ids, 1, bits, steps) / 4)
            raise BudgetError(f"alpt needs at least {needed:,} parameters (one {bits}-bit column per vocabulary row "
                              f"and its step sizes); budget {budget:,}")  # fmt: skip
        return cls(features, vocabularies, dim, bits=bits, granularity=granularity, **options)
