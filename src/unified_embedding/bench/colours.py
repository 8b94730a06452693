"""One fixed colour per embedding method, the same in every plot of every report."""

from __future__ import annotations

import hashlib

#: Hand-picked for the registered methods: the product (`unified`) in strong red, its
#: one-probe special case in orange, the baselines it is measured against in blues and greys.
METHOD_COLOURS = {
    "unified": "#d62728",
    "multiplexed": "#ff7f0e",
    "hashing": "#1f77b4",
    "full": "#222222",
    "qr": "#2ca02c",
    "robe": "#9467bd",
    "dhe": "#8c564b",
    "tt_rec": "#e377c2",
    "hash_embedding": "#17becf",
    "double_hash": "#bcbd22",
    "hashednet": "#7f7f7f",
    "low_rank": "#aec7e8",
    "mixed_dim": "#98df8a",
    "pep": "#c5b0d5",
    "pq": "#c49c94",
    "zch": "#393b79",
    "optembed": "#637939",
    "autodim": "#8c6d31",
    "autosrh": "#843c39",
    "dpq": "#7b4173",
    "mgqe": "#3182bd",
    "alpt": "#e6550d",
    "deeplight": "#31a354",
    "adaembed": "#756bb1",
}

#: Colours for methods registered later, chosen by a stable hash of the name (never by order).
_SPARE = ["#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354", "#756bb1", "#636363"]


def method_colour(method: str) -> str:
    base = method.split("[", 1)[0]
    if base in METHOD_COLOURS:
        return METHOD_COLOURS[base]
    digest = int(hashlib.sha256(base.encode()).hexdigest(), 16)
    return _SPARE[digest % len(_SPARE)]
