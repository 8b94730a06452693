"""Run configurations for the lab, as stored in the results database."""

from __future__ import annotations

from dataclasses import fields
from typing import Any

from unified_embedding.stream import StreamConfig
from unified_embedding.train import TrainConfig

#: One run of the lab: a training run, or a streaming run (`ue bench --protocol stream`).
RunConfig = TrainConfig | StreamConfig


def train_config(config: RunConfig) -> TrainConfig:
    """The model-defining part of a run of either protocol (dataset, method, budget, seed)."""
    return config.train if isinstance(config, StreamConfig) else config


def make_config(**values: Any) -> TrainConfig:
    """A validated config (`max_rows` trains and evaluates on the first rows of the dataset)."""
    return TrainConfig(**values).validate()


def config_from_dict(values: dict[str, Any]) -> TrainConfig:
    """The config stored in a run's `config` JSON (the inverse of `dataclasses.asdict`)."""
    known = {f.name for f in fields(TrainConfig)}
    return make_config(**{k: v for k, v in values.items() if k in known})
