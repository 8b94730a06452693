"""The paper's feature-multiplexing decomposition, measured on a trained model.

With one table shared by every feature (`multiplexed`, `unified`), a row r is read by the
values of several features that hash to it. The model's first layer reads feature f's slot
through its own block of columns W_f (every linear layer that reads the embedding, each
scaled to unit Frobenius norm, stacked), so the features sharing a row can tell their uses
of it apart as far as their blocks differ. The paper's claim is that the model does exactly
this: a shared row decomposes into per-feature components that barely interfere. Measured
here, per slot s (one probe of one feature) and per *shared row* r (read by training values
of >= 2 features):

- **shares**: the share of the row's squared norm that each tenant feature reads, the
  squared projection ||U_f^T e_r||^2 of the row onto f's input subspace U_f (the top right
  singular vectors of W_f holding `energy`, default 90 %, of its squared singular values),
  normalised over the row's tenants, so the shares of a row sum to 1 (a feature with several
  probes counts its largest);
- **overlap** of the input subspaces, ||U_f^T U_g||_F^2 / min(k_f, k_g): 0 orthogonal, 1 one
  inside the other, beside max(k_f, k_g) / d, its value for random subspaces;
- **per-feature projections**: the first layer maps row r to W_f e_r when f reads it and to
  W_g e_r when g does; their cosine |cos(W_f e_r, W_g e_r)|, averaged over the row's tenant
  pairs, says whether the two uses of one row look alike downstream (1) or are orthogonal
  (0). **readout similarity** is its row-free version for a pair of features,
  ||sym(W_f^T W_g)||_F / sqrt(||W_f^T W_f||_F ||W_g^T W_g||_F). Both are given beside their
  values for Gaussian random weights of the same shape (the untrained reference).

Numbers at the random reference mean the first layer separates colliding features only as
well as random projections do (which, in high dimension, is already well: why multiplexing
works at all); numbers below it mean training separated them further.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from unified_embedding.bench.tables import SlotReads, slot_reads
from unified_embedding.checkpoint import load
from unified_embedding.network import CTRNetwork
from unified_embedding.train import TrainConfig, build_network, prepare

DEFAULT_ENERGY = 0.9
#: Shared rows kept (the most loaded) when a decomposition is stored or plotted.
STORED_ROWS = 40


@dataclass
class Decomposition:
    """Per shared row, the share of its squared norm read by each feature; subspace overlaps between features."""

    method: str
    features: list[str]
    chunk_dim: int
    energy: float
    table_rows: int
    subspace_dims: dict[str, list[int]]  # per feature, k of each of its slots
    rows: np.ndarray  # [R] indices of shared rows
    tenants: np.ndarray  # [R] number of features reading each shared row
    shares: np.ndarray  # [R, F] share of each feature (0 for non-tenants); rows sum to 1
    cosine: np.ndarray  # [R] mean |cos(W_f e_r, W_g e_r)| over the row's pairs of tenant slots of different features
    cosine_random: np.ndarray  # [R] the same with Gaussian random first-layer weights
    overlap: np.ndarray  # [F, F] subspace overlap between features (diagonal: between a feature's own probes, or 1)
    baseline: np.ndarray  # [F, F] expected overlap of random subspaces of the same dimensions
    readout: np.ndarray  # [F, F] readout similarity between features
    readout_random: np.ndarray  # [F, F] the same with Gaussian random first-layer weights
    co_tenancy: np.ndarray  # [F, F] number of rows read by both features
    notes: list[str] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """The headline numbers (JSON-able)."""
        f = len(self.features)
        off = ~np.eye(f, dtype=bool)
        weights = self.co_tenancy[off].astype(float)
        weighted = float((self.overlap[off] * weights).sum() / weights.sum()) if weights.sum() else math.nan
        weighted_base = float((self.baseline[off] * weights).sum() / weights.sum()) if weights.sum() else math.nan
        max_share = self.shares.max(axis=1) if len(self.rows) else np.zeros(0)
        return {
            "method": self.method,
            "table_rows": self.table_rows,
            "shared_rows": len(self.rows),
            "shared_row_fraction": len(self.rows) / max(self.table_rows, 1),
            "mean_tenants": float(self.tenants.mean()) if len(self.rows) else 0.0,
            "mean_dominant_share": float(max_share.mean()) if len(max_share) else math.nan,
            "even_split_share": float((1.0 / self.tenants).mean()) if len(self.rows) else math.nan,
            "mean_overlap": float(self.overlap[off].mean()) if f > 1 else math.nan,
            "mean_overlap_random": float(self.baseline[off].mean()) if f > 1 else math.nan,
            "co_tenant_overlap": weighted,
            "co_tenant_overlap_random": weighted_base,
            "mean_projection_cosine": _nanmean(self.cosine),
            "mean_projection_cosine_random": _nanmean(self.cosine_random),
            "mean_readout_similarity": float(self.readout[off].mean()) if f > 1 else math.nan,
            "mean_readout_similarity_random": float(self.readout_random[off].mean()) if f > 1 else math.nan,
            "mean_subspace_dim": float(np.mean([k for ks in self.subspace_dims.values() for k in ks])),
            "chunk_dim": self.chunk_dim,
            "energy": self.energy,
        }

    def to_dict(self, max_rows: int = STORED_ROWS) -> dict[str, Any]:
        """JSON-able form with the `max_rows` most loaded shared rows (what the report plots)."""
        keep = np.argsort(-self.tenants, kind="stable")[:max_rows]
        keep = keep[np.lexsort((self.rows[keep], -self.tenants[keep]))]
        return {
            "summary": self.summary(),
            "method": self.method,
            "features": list(self.features),
            "subspace_dims": self.subspace_dims,
            "overlap": _finite(self.overlap),
            "baseline": _finite(self.baseline),
            "readout": _finite(self.readout),
            "readout_random": _finite(self.readout_random),
            "cosine": [None if not np.isfinite(v) else round(float(v), 6) for v in self.cosine[keep]],
            "co_tenancy": self.co_tenancy.astype(int).tolist(),
            "rows": self.rows[keep].astype(int).tolist(),
            "tenants": self.tenants[keep].astype(int).tolist(),
            "shares": np.round(self.shares[keep], 6).tolist(),
            "notes": list(self.notes),
        }


def _nanmean(values: np.ndarray) -> float:
    values = values[np.isfinite(values)]
    return float(values.mean()) if len(values) else math.nan


def _finite(matrix: np.ndarray) -> list[list[float | None]]:
    return [[None if not np.isfinite(v) else round(float(v), 6) for v in row] for row in matrix]


def reading_weights(network: CTRNetwork) -> torch.Tensor:
    """[H, W+D]: every linear layer that reads a vector laid out like concat(emb, dense), each scaled to unit norm.

    For MLP and DCN-v2 these are the first MLP layer and the cross layers (whose outputs keep
    the input's layout); for LR and FM the single output weight.
    """
    model = network.model
    width = network.embedding.output_dim
    for wanted in (getattr(model, "input_dim", width), width):
        mats = [m.weight.detach() for m in model.modules() if isinstance(m, nn.Linear) and m.in_features == wanted]
        if mats:
            return torch.cat([m / m.norm().clamp(min=1e-12) for m in mats], 0).float()
    raise ValueError(f"model {type(model).__name__} has no linear layer reading the embedding (width {width})")


def _subspace(block: np.ndarray, energy: float) -> np.ndarray:
    """[d, k] orthonormal top right singular vectors of `block` [H, d] holding `energy` of its squared norm.

    From the d x d Gram matrix (eigenvalues = squared singular values): cheap for any H.
    """
    power, vectors = np.linalg.eigh(block.T @ block)
    power, vectors = np.clip(power[::-1], 0, None), vectors[:, ::-1]
    if power.sum() == 0.0:
        return vectors[:, :1]
    k = int(np.searchsorted(np.cumsum(power) / power.sum(), energy)) + 1
    return vectors[:, : min(k, len(power))]


@torch.no_grad()
def decompose(
    network: CTRNetwork, vocabularies: Mapping[str, np.ndarray], *, energy: float = DEFAULT_ENERGY
) -> Decomposition:
    """Measure the decomposition of `network`'s shared rows (see the module docstring)."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    reads: SlotReads = slot_reads(network.embedding, vocabularies)
    embedding = network.embedding
    weights = reading_weights(network).double().numpy()
    table = embedding.weight.detach().double().numpy()
    d, names = reads.chunk_dim, list(reads.features)
    f_count, num_rows = len(names), reads.num_rows
    bases = [_subspace(weights[:, s * d : (s + 1) * d], energy) for s in range(len(reads.rows))]
    read = np.zeros((num_rows, f_count))  # ||U_s^T e_r||^2, largest over the feature's slots
    tenant = np.zeros((num_rows, f_count), dtype=bool)
    for s, rows in enumerate(reads.rows):
        f = reads.slot_feature[s]
        unique = np.unique(rows)
        energy_read = np.square(table[unique] @ bases[s]).sum(1)
        read[unique, f] = np.maximum(read[unique, f], energy_read)
        tenant[unique, f] = True
    count = tenant.sum(1)
    shared = np.flatnonzero(count >= 2)
    total = (read[shared] * tenant[shared]).sum(1)
    notes = []
    if (total == 0).any():
        notes.append(f"{int((total == 0).sum())} shared rows are zero vectors and were left out")
        shared, total = shared[total > 0], total[total > 0]
    shares = read[shared] * tenant[shared] / total[:, None]
    co = (
        tenant[shared].T.astype(np.int64) @ tenant[shared].astype(np.int64)
        if len(shared)
        else np.zeros((f_count, f_count))
    )
    overlap, baseline = _overlaps(bases, reads.slot_feature, f_count, d)
    slots = len(reads.rows)
    gram = weights[:, : slots * d].T @ weights[:, : slots * d]
    noise = np.random.default_rng(0).standard_normal((weights.shape[0], slots * d))
    gram_random = noise.T @ noise
    cosine = _row_cosines(gram, table, reads, shared, d)
    cosine_random = _row_cosines(gram_random, table, reads, shared, d)
    readout = _readout(gram, reads.slot_feature, f_count, d)
    readout_random = _readout(gram_random, reads.slot_feature, f_count, d)
    dims: dict[str, list[int]] = {name: [] for name in names}
    for s, basis in enumerate(bases):
        dims[names[reads.slot_feature[s]]].append(int(basis.shape[1]))
    return Decomposition(
        method=embedding.name, features=names, chunk_dim=d, energy=energy, table_rows=num_rows,
        subspace_dims=dims, rows=shared, tenants=count[shared], shares=shares, cosine=cosine,
        cosine_random=cosine_random, overlap=overlap, baseline=baseline, readout=readout,
        readout_random=readout_random, co_tenancy=co, notes=notes,
    )  # fmt: skip


def _row_cosines(gram: np.ndarray, table: np.ndarray, reads: SlotReads, shared: np.ndarray, d: int) -> np.ndarray:
    """Per shared row, the mean |cos(W_s e, W_t e)| over its tenant slots s, t of different features.

    From the Gram matrix of the first layer's embedding columns: (W_s e).(W_t e) = e^T G_st e.
    """
    rows = [np.intersect1d(np.unique(r), shared, assume_unique=True) for r in reads.rows]
    total = np.zeros(len(shared))
    pairs = np.zeros(len(shared))
    for s in range(len(rows)):
        for t in range(s + 1, len(rows)):
            if reads.slot_feature[s] == reads.slot_feature[t]:
                continue
            common = np.intersect1d(rows[s], rows[t], assume_unique=True)
            if not len(common):
                continue
            e = table[common]
            block = slice(s * d, (s + 1) * d), slice(t * d, (t + 1) * d)
            g_ss = gram[block[0], block[0]]
            g_tt = gram[block[1], block[1]]
            g_st = gram[block[0], block[1]]
            dot = np.einsum("ri,ij,rj->r", e, g_st, e)
            norms = np.sqrt(np.einsum("ri,ij,rj->r", e, g_ss, e) * np.einsum("ri,ij,rj->r", e, g_tt, e))
            ok = norms > 0
            where = np.searchsorted(shared, common[ok])
            np.add.at(total, where, np.abs(dot[ok] / norms[ok]))
            np.add.at(pairs, where, 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return total / pairs


def _readout(gram: np.ndarray, slot_feature: np.ndarray, f_count: int, d: int) -> np.ndarray:
    """Mean over slot pairs of ||sym(W_s^T W_t)||_F / sqrt(||W_s^T W_s||_F ||W_t^T W_t||_F), per feature pair."""
    total = np.zeros((f_count, f_count))
    pairs = np.zeros((f_count, f_count))
    norms = [np.linalg.norm(gram[s * d : (s + 1) * d, s * d : (s + 1) * d]) for s in range(len(slot_feature))]
    for s in range(len(slot_feature)):
        for t in range(len(slot_feature)):
            if s == t:
                continue
            g_st = gram[s * d : (s + 1) * d, t * d : (t + 1) * d]
            value = np.linalg.norm((g_st + g_st.T) / 2) / max(math.sqrt(norms[s] * norms[t]), 1e-300)
            f, g = slot_feature[s], slot_feature[t]
            total[f, g] += value
            pairs[f, g] += 1
    with np.errstate(invalid="ignore"):
        readout = total / pairs
    single = pairs.diagonal() == 0
    readout[np.diag_indices(f_count)] = np.where(single, 1.0, readout.diagonal())
    return readout


def _overlaps(bases: list[np.ndarray], slot_feature: np.ndarray, f_count: int, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean slot-pair overlap between features, and its random-subspace expectation."""
    total = np.zeros((f_count, f_count))
    base = np.zeros((f_count, f_count))
    pairs = np.zeros((f_count, f_count))
    for s, us in enumerate(bases):
        for t, ut in enumerate(bases):
            if s == t:
                continue
            f, g = slot_feature[s], slot_feature[t]
            ks, kt = us.shape[1], ut.shape[1]
            total[f, g] += float(np.square(us.T @ ut).sum()) / min(ks, kt)
            base[f, g] += max(ks, kt) / d
            pairs[f, g] += 1
    with np.errstate(invalid="ignore"):
        overlap, baseline = total / pairs, base / pairs
    single = pairs.diagonal() == 0  # a one-probe feature: its subspace overlaps itself fully
    overlap[np.diag_indices(f_count)] = np.where(single, 1.0, overlap.diagonal())
    baseline[np.diag_indices(f_count)] = np.where(single, 1.0, baseline.diagonal())
    return overlap, baseline


def decompose_saved(config: TrainConfig, model_path: str | Path, *, energy: float = DEFAULT_ENERGY) -> Decomposition:
    """The decomposition of a finished run's saved model (`Trainer(config, output).run()` writes it beside run.json)."""
    prepared = prepare(config)
    network = build_network(config, prepared)
    network.load_state_dict(load(model_path)["model"])
    network.eval()
    return decompose(network, prepared.vocabularies, energy=energy)


def train_and_decompose(
    config: TrainConfig, work_dir: str | Path, *, energy: float = DEFAULT_ENERGY, progress: bool = False
) -> tuple[dict[str, Any], Decomposition]:
    """Train `config` (writing run.json and the model into `work_dir`), then measure its decomposition."""
    from unified_embedding.train import Trainer

    output = Path(work_dir) / f"{config.fingerprint()}.json"
    result = Trainer(config, output, progress=progress).run(resume=True)
    return result, decompose_saved(config, output.with_suffix(".pt"), energy=energy)


# --------------------------------------------------------------------------- figure
def _matrix(values: list[list[float | None]]) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in values], dtype=float)


def plot_decomposition(data: Mapping[str, Any], path: str | Path, title: str) -> Path:
    """Three panels: per-feature shares of the most loaded shared rows (with their projection cosines);
    the input-subspace overlap between features; the readout similarity between features."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    features = list(data["features"])
    shares = np.asarray(data["shares"], dtype=float).reshape(-1, len(features))
    summary = data.get("summary", {})
    colours = _feature_colours(features)
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(20, 6), gridspec_kw={"width_ratios": [1.6, 1, 1]})
    x = np.arange(len(shares))
    bottom = np.zeros(len(shares))
    for j, name in enumerate(features):
        if shares.size and shares[:, j].any():
            left.bar(x, shares[:, j], bottom=bottom, color=colours[name], label=name, width=0.85)
            bottom += shares[:, j]
    cosine = np.array([np.nan if v is None else v for v in data.get("cosine", [])], dtype=float)
    if len(cosine) == len(x) and len(x):
        left.plot(x, cosine, "kD", markersize=4, label="|cos| of the features' projections")
        random = summary.get("mean_projection_cosine_random", math.nan)
        if np.isfinite(random):
            left.axhline(random, color="black", linestyle="--", linewidth=1, label="|cos| with random weights (mean)")
    left.set_xticks(x, [str(r) for r in data["rows"]], rotation=90, fontsize=6)
    left.set_xlabel("shared table row (the most loaded rows)")
    left.set_ylabel("share of the row's squared norm read by each feature")
    left.set_ylim(0, 1.0)
    left.set_title("per-feature components of shared rows")
    if shares.size:
        left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), fontsize=7, ncol=5, frameon=False)
    panels = [
        (middle, "overlap", "input-subspace overlap", "mean_overlap", "mean_overlap_random", "random subspaces"),
        (right, "readout", "readout similarity", "mean_readout_similarity", "mean_readout_similarity_random",
         "random weights"),
    ]  # fmt: skip
    for ax, key, name, mean_key, random_key, reference in panels:
        if key not in data:  # stored by an older version
            ax.axis("off")
            continue
        image = ax.imshow(_matrix(data[key]), vmin=0, vmax=1, cmap="viridis")
        ax.set_xticks(range(len(features)), features, rotation=90, fontsize=7)
        ax.set_yticks(range(len(features)), features, fontsize=7)
        ax.set_title(
            f"{name} between features\nmean {summary.get(mean_key, math.nan):.2f}, "
            f"{reference} {summary.get(random_key, math.nan):.2f}",
            fontsize=9,
        )
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=f"{name} (0 separate, 1 identical)")
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def _feature_colours(features: list[str]) -> dict[str, Any]:
    import matplotlib

    cmap = matplotlib.colormaps["tab20"]
    return {name: cmap(i % 20) for i, name in enumerate(features)}
