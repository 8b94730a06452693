"""CTR backbones: `forward(emb [B, W], dense [B, D]) -> logits [B]`, one file per model.

    from unified_embedding.models import build_model
    model = build_model("dcnv2", feature_dims=method.out_dims, num_dense=13, num_cross_layers=2)

`MODELS` maps names to classes; `build_model` is the one place that checks the name and the
hyperparameter keys (values are checked by each model's constructor). `model_hparams(name)`
lists a model's hyperparameters with their defaults (for CLIs and configs).
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

from unified_embedding.models.base import CTRModel, DenseField
from unified_embedding.models.dcnv2 import DCNv2
from unified_embedding.models.deepfm import DeepFM
from unified_embedding.models.dlrm import DLRM
from unified_embedding.models.fm import FM
from unified_embedding.models.lr import LR
from unified_embedding.models.mlp import MLPModel

MODELS: dict[str, type[CTRModel]] = {
    "lr": LR,
    "fm": FM,
    "deepfm": DeepFM,
    "dcnv2": DCNv2,
    "dlrm": DLRM,
    "mlp": MLPModel,
}

_POSITIONAL = ("self", "feature_dims", "num_dense")


def _model_class(name: str) -> type[CTRModel]:
    try:
        return MODELS[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown model {name!r}; known models: {', '.join(MODELS)}") from None


def model_hparams(name: str) -> dict[str, Any]:
    """The hyperparameters of model `name` and their defaults."""
    params = inspect.signature(_model_class(name).__init__).parameters
    return {k: p.default for k, p in params.items() if k not in _POSITIONAL}


def build_model(name: str, feature_dims: Sequence[int], num_dense: int, **hparams: Any) -> CTRModel:
    """Build model `name` for sparse feature widths `feature_dims` and `num_dense` dense features.

    Raises ValueError for an unknown model name (listing the known ones) or a hyperparameter the
    model does not take (naming model and key, listing the accepted keys).
    """
    cls = _model_class(name)
    known = model_hparams(name)
    unknown = [k for k in hparams if k not in known]
    if unknown:
        accepted = ", ".join(known) if known else "none"
        keys = ", ".join(map(repr, unknown))
        raise ValueError(f"model {name!r} has no hyperparameter {keys}; accepted hyperparameters: {accepted}")
    return cls(feature_dims, num_dense, **hparams)


__all__ = [
    "DLRM",
    "FM",
    "LR",
    "MODELS",
    "CTRModel",
    "DCNv2",
    "DeepFM",
    "DenseField",
    "MLPModel",
    "build_model",
    "model_hparams",
]
