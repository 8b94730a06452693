"""Progressive validation in time order: predict each window, score it, then train on it, once.

This is how a CTR model lives in production: it serves today's traffic with what it
learned up to yesterday, then learns today. Every example is scored before the model has
trained on it, so the score needs no held-out split, and examples whose ids the stream had
never shown (new users, new ads) can be scored separately: the paper's dynamic-data claim.

Memory stays bounded on a stream far longer than memory: windows are gathered one at a
time from memory-mapped columns (or made by a generator), the overall metrics are
histograms (metrics.py) and the seen-id set is a Bloom filter (seen.py), so what grows is
one small record per window.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import resource
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from tqdm.auto import tqdm

from unified_embedding.checkpoint import load_to_resume, save_atomic, write_text_atomic
from unified_embedding.data import BatchLoader, CTRData, Split, vocabularies
from unified_embedding.embeddings import FullEmbedding
from unified_embedding.embeddings.base import resolve_budget
from unified_embedding.network import CTRNetwork
from unified_embedding.provenance import versions
from unified_embedding.stream.metrics import StreamingMetrics, window_metrics
from unified_embedding.stream.seen import DEFAULT_BITS_LOG2, SeenIds, batch_keys
from unified_embedding.train import Optimizers, Prepared, TrainConfig, build_network, load_data, train_step

#: rows predicted at once (prediction needs no gradient, so larger batches are cheaper)
PREDICT_BATCH = 8192
#: Mini-batch of the one pass. Chosen on the past only: streaming the first half (by time) of
#: MovieLens-100K, the real stream's warm-up, with half of it as warm-up, mean AUC of unified
#: and full at 0.25x was 0.638 at 128, 0.628 at 256, 0.614 at 512 and 0.566 at 1024: one pass
#: needs more, smaller steps than epochs to early stopping do.
DEFAULT_BATCH_SIZE = 128
#: The examples scored separately, by the prefix of their metrics: all of them (""); those with
#: a (feature, id) first seen in their own window ("new_"); those with one the warm-up never
#: showed ("cold_": what a vocabulary built at the start maps to its OOV row, however often
#: the id has been seen since).
GROUPS = ("", "new_", "cold_")


@dataclass
class StreamConfig:
    """A streaming run: the model, method and optimizer of `train` (its epochs, patience and
    split are not used: a stream is one pass in time order), plus the stream's own settings."""

    train: TrainConfig
    #: examples per scored window
    window: int = 10_000
    #: share of the stream, from its start, that only trains (and defines `full`'s vocabulary)
    warmup: float = 0.5
    #: checkpoint after every this many windows (warm-up windows included)
    checkpoint_every: int = 1
    #: size of the seen-id Bloom filter (seen.py), 2^27 bits = 16 MiB
    seen_bits_log2: int = DEFAULT_BITS_LOG2

    def validate(self) -> StreamConfig:
        self.train.validate()
        if isinstance(self.window, bool) or not isinstance(self.window, int) or self.window < 1:
            raise ValueError(f"window must be a positive number of examples, got {self.window!r}")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup must be a share of the stream in [0, 1), got {self.warmup}")
        if self.checkpoint_every < 1:
            raise ValueError(f"checkpoint_every must be >= 1 window, got {self.checkpoint_every}")
        return self

    def fingerprint(self) -> str:
        defining = {"train": self.train.fingerprint(), "window": self.window, "warmup": self.warmup,
                    "seen_bits_log2": self.seen_bits_log2}  # fmt: skip
        return hashlib.sha256(json.dumps(defining, sort_keys=True).encode()).hexdigest()[:16]


class Window(NamedTuple):
    """A stretch of the stream: `rows` of `data`, in time order; `scored` is False during warm-up."""

    data: CTRData
    rows: np.ndarray
    scored: bool


@dataclass
class Stream:
    """What a streaming run consumes: the network to train and `count` windows, made on demand."""

    network: CTRNetwork
    count: int
    window: Callable[[int], Window]
    describe: dict[str, Any]


def time_order(data: CTRData) -> np.ndarray:
    if data.time is None:
        raise ValueError(f"dataset {data.name!r} has no time (or row order) to stream in; streaming needs one")
    return np.argsort(data.time, kind="stable").astype(np.int64)


def window_bounds(total: int, warmup: int, window: int) -> list[tuple[int, int]]:
    """[start, end) of each window: the warm-up cut into windows, then the rest."""
    cuts = list(range(0, warmup, window)) + list(range(warmup, total, window)) + [total]
    return [(start, end) for start, end in itertools.pairwise(cuts) if end > start]


def dataset_stream(config: StreamConfig, data: CTRData | None = None) -> Stream:
    """A real dataset (`config.train.dataset`, or `data` when given) in time order.

    `full`'s vocabulary (and every method's cardinalities) come from the warm-up, which is
    all a model built at the stream's start could know; the budget's reference ("1x") is
    `full` over every id of the stream, so 0.25x means a quarter of what collisionless rows
    for all the ids that will arrive would cost.
    """
    train = config.train
    data = load_data(train) if data is None else data
    order = time_order(data)
    warm = math.floor(config.warmup * len(order))
    if warm < 1:
        raise ValueError(
            f"a warm-up of {config.warmup} of {len(order)} rows is empty; the model needs ids to start from"
        )
    vocab = vocabularies(data, order[:warm])
    features = data.features.with_cardinalities({name: len(ids) for name, ids in vocab.items()})
    reference = FullEmbedding.parameter_count(data.features, vocabularies(data, order))
    prepared = Prepared(data, Split(order[:warm], order[:0], order[warm:]), features, vocab, reference,
                        resolve_budget(train.budget, reference))  # fmt: skip
    bounds = window_bounds(len(order), warm, config.window)
    return Stream(
        network=build_network(train, prepared),
        count=len(bounds),
        window=lambda i: Window(data, order[bounds[i][0] : bounds[i][1]], bounds[i][0] >= warm),
        describe={
            "rows": len(order),
            "warmup_rows": warm,
            "budget": prepared.budget,
            "full_embedding_params": reference,
        },
    )


class StreamRunner:
    """Runs a stream to a stream.json, checkpointing so a killed run resumes to the same result."""

    def __init__(self, config: StreamConfig, output: str | Path | None = None, *, progress: bool = True) -> None:
        self.config = config.validate()
        self.output = Path(output) if output else None
        self.checkpoint_path = self.output.with_suffix(".ckpt") if self.output else None
        self.progress = progress

    def run(self, stream: Stream | None = None, *, resume: bool = False) -> dict[str, Any]:
        config = self.config
        stream = stream or dataset_stream(config)
        network = stream.network
        optimizers = Optimizers.for_config(network, config.train)
        state = {"window": 0, "windows": [], "seconds": 0.0, "metrics": {g: StreamingMetrics() for g in GROUPS},
                 "seen": SeenIds(config.seen_bits_log2), "warm": None}  # fmt: skip
        if resume and self.checkpoint_path and self.checkpoint_path.exists():
            optimizers = self._restore(network, state)
        bar = tqdm(total=stream.count, initial=state["window"], desc="stream", unit="window", disable=not self.progress)
        while state["window"] < stream.count:
            started = time.perf_counter()
            window = stream.window(state["window"])
            record = self._window(network, optimizers, window, state)
            state["seconds"] += time.perf_counter() - started
            if record is not None:
                record.update(window=state["window"], seconds=state["seconds"], rss_mib=current_rss_mib())
                state["windows"].append(record)
                bar.set_postfix(auc=f"{record['auc'] or float('nan'):.4f}")
            state["window"] += 1
            bar.update()
            if state["window"] % config.checkpoint_every == 0 or state["window"] == stream.count:
                self._checkpoint(network, optimizers, state)
        bar.close()
        result = self._result(network, stream, state)
        if self.output:
            write_text_atomic(json.dumps(result, indent=2) + "\n", self.output)
        return result

    def _window(self, network: CTRNetwork, optimizers: Optimizers, window: Window, state: dict) -> dict | None:
        """Score the window (if it is past the warm-up), remember its ids, then train on it in time order."""
        record = None
        if window.scored:
            if state["warm"] is None:  # the ids of the warm-up, frozen
                state["warm"] = state["seen"].copy()
            scores, labels, new, cold = self._predict(network, window, state["seen"], state["warm"])
            record = {}
            for group, chosen in zip(GROUPS, (np.ones_like(new), new, cold), strict=True):
                state["metrics"][group].add(scores[chosen], labels[chosen])
                record[f"{group}examples"] = int(chosen.sum())
                record.update({f"{group}{k}": v for k, v in window_metrics(scores[chosen], labels[chosen]).items()})
            if window.data.time is not None:
                times = window.data.time[window.rows]
                record.update(first_time=int(times.min()), last_time=int(times.max()))
        loader = BatchLoader(window.data, window.rows, self.config.train.batch_size)
        for batch in loader.batches(prefetch=2):
            if not window.scored:
                state["seen"].add(batch_keys(batch))
            train_step(network, optimizers, batch, f"in window {state['window']}")
        return record

    @torch.no_grad()
    def _predict(self, network: CTRNetwork, window: Window, seen: SeenIds, warm: SeenIds) -> tuple[np.ndarray, ...]:
        """Scores, labels, and which examples are new (in this window) and cold (unknown to the warm-up)."""
        network.eval()
        scores, labels, new, cold, keys = [], [], [], [], []
        for batch in BatchLoader(window.data, window.rows, PREDICT_BATCH).batches():
            scores.append(torch.sigmoid(network(batch)).numpy())
            labels.append(batch.labels.numpy())
            new.append(seen.new_examples(batch))
            cold.append(warm.new_examples(batch))
            keys.append(batch_keys(batch))
        network.train()
        seen.add(torch.cat(keys))  # after the whole window: an id first seen in it is new in all its examples
        return tuple(np.concatenate(parts) for parts in (scores, labels, new, cold))

    def _checkpoint(self, network: CTRNetwork, optimizers: Optimizers, state: dict) -> None:
        if not self.checkpoint_path:
            return
        save_atomic(
            {
                "fingerprint": self.config.fingerprint(),
                "window": state["window"], "windows": state["windows"], "seconds": state["seconds"],
                "metrics": {group: metrics.state_dict() for group, metrics in state["metrics"].items()},
                "seen": state["seen"].state_dict(), "warm": state["warm"] and state["warm"].state_dict(),
                "model": network.state_dict(), "optimizers": optimizers.state_dict(), "rng": torch.get_rng_state(),
            },
            self.checkpoint_path,
        )  # fmt: skip

    def _restore(self, network: CTRNetwork, state: dict) -> Optimizers:
        saved = load_to_resume(self.checkpoint_path, self.config.fingerprint())
        network.load_state_dict(saved["model"])
        train = self.config.train
        optimizers = Optimizers.for_config(network, train)
        optimizers.load_state_dict(saved["optimizers"])
        torch.set_rng_state(saved["rng"])
        state.update(window=saved["window"], windows=saved["windows"], seconds=saved["seconds"])
        for group, metrics in state["metrics"].items():
            metrics.load_state_dict(saved["metrics"][group])
        state["seen"].load_state_dict(saved["seen"])
        if saved["warm"] is not None:
            state["warm"] = SeenIds(self.config.seen_bits_log2)
            state["warm"].load_state_dict(saved["warm"])
        return optimizers

    def _result(self, network: CTRNetwork, stream: Stream, state: dict) -> dict[str, Any]:
        embedding = network.embedding
        train = self.config.train
        metrics = {}
        for group, accumulated in state["metrics"].items():
            metrics.update({f"{group}{key}": value for key, value in accumulated.result().items()})
        return {
            "protocol": "stream",
            "dataset": train.dataset, "method": train.method, "model": train.model, "seed": train.seed,
            **stream.describe,
            "num_embedding_params": embedding.num_parameters(), "num_embedding_bytes": embedding.num_bytes(),
            "num_params": sum(p.numel() for p in network.parameters()),
            **metrics,
            "windows": state["windows"],
            "seconds": state["seconds"], "peak_rss_mib": peak_rss_mib(),
            "config": {**asdict(self.config), "train": asdict(train)},
            "fingerprint": self.config.fingerprint(),
            "versions": versions(),
        }  # fmt: skip


def current_rss_mib() -> float:
    """Resident memory now (Linux /proc), in MiB."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * resource.getpagesize() / 2**20


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
