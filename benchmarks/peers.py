"""This library's DCNv2 against the CTR libraries users already know, on the same split.

One run, one thread each, the same rows in train / validation / test (this library's seeded
80/10/10 split), the same per-feature vocabularies (values seen in training; one extra row
for everything else), width-16 embeddings, three full-rank cross layers, an MLP of 400-400-400
with batch norm and dropout 0.3, Adam at 1e-3, batches of 1,024, at most 30 epochs with early
stopping on validation AUC (patience 2), the best epoch's weights scored once on test. What
stays each library's own: its initialisation, its regularisation defaults and its training
loop. DeepCTR-Torch's only DCN is the parallel one (cross and deep side by side) with a linear
part; ours is stacked.

    pip install --no-deps deepctr-torch==0.3.0 fuxictr==2.3.10   # no-deps: keep the CPU torch
    pip install pandas pyyaml h5py polars ray                      # what fuxictr imports
    python benchmarks/peers.py --data-dir ../shared/datasets --datasets movielens-100k,frappe --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from quality import mean_se, write_runs
from sklearn.metrics import log_loss, roc_auc_score

from unified_embedding.data import CTRData, load_dataset, split_indices, vocabularies
from unified_embedding.features import FeatureKind
from unified_embedding.train import TrainConfig, Trainer

EMBEDDING_DIM = 16
HIDDEN = (400, 400, 400)
BATCH_SIZE = 1024
MAX_EPOCHS = 30
PATIENCE = 2


@dataclass
class Coded:
    """A split's rows as per-feature integer codes: 0..n-1 for training values, n for the rest."""

    columns: dict[str, np.ndarray]  # [N] codes, or [N, max_len] codes + 1 with 0 as padding (lists)
    dense: np.ndarray
    labels: np.ndarray


def code_split(data: CTRData, rows: np.ndarray, vocab: dict[str, np.ndarray]) -> Coded:
    part = data.take(rows)
    columns = {}
    for feature in data.features:
        if feature.kind is FeatureKind.CATEGORICAL:
            columns[feature.name] = _codes(part.categorical[feature.name], vocab[feature.name])
        elif feature.kind is FeatureKind.MULTIVALENT:
            values, offsets = part.multivalent[feature.name]
            lengths = np.diff(offsets)
            padded = np.zeros((part.num_rows, max(int(lengths.max()), 1)), dtype=np.int64)
            positions = np.arange(len(values)) - np.repeat(offsets[:-1], lengths)
            padded[np.repeat(np.arange(part.num_rows), lengths), positions] = _codes(values, vocab[feature.name]) + 1
            columns[feature.name] = padded
    return Coded(columns, np.asarray(part.dense, dtype=np.float32), np.asarray(part.labels, dtype=np.float32))


def _codes(ids: np.ndarray, known: np.ndarray) -> np.ndarray:
    at = np.searchsorted(known, ids)
    found = (at < len(known)) & (known[np.minimum(at, len(known) - 1)] == ids)
    return np.where(found, at, len(known)).astype(np.int64)


def train_deepctr(data: CTRData, splits: dict[str, Coded], vocab: dict[str, np.ndarray], seed: int) -> dict:
    """DeepCTR-Torch's DCN (matrix cross layers = DCN-M / DCNv2), our protocol around its `fit`."""
    from deepctr_torch.inputs import DenseFeat, SparseFeat, VarLenSparseFeat
    from deepctr_torch.models import DCN

    columns = []
    for feature in data.features:
        if feature.kind is FeatureKind.CATEGORICAL:
            columns.append(SparseFeat(feature.name, len(vocab[feature.name]) + 1, EMBEDDING_DIM))
        elif feature.kind is FeatureKind.MULTIVALENT:
            sparse = SparseFeat(feature.name, len(vocab[feature.name]) + 2, EMBEDDING_DIM)
            width = splits["train"].columns[feature.name].shape[1]
            columns.append(VarLenSparseFeat(sparse, width, combiner=feature.pooling.value))
        else:
            columns.append(DenseFeat(feature.name, 1))
    dense_names = [f.name for f in data.features if f.kind is FeatureKind.DENSE]

    def inputs(part: Coded) -> dict[str, np.ndarray]:
        out = {}
        for name, codes in part.columns.items():
            wanted = splits["train"].columns[name]
            if codes.ndim == 2 and codes.shape[1] != wanted.shape[1]:  # pad or cut lists to training's width
                fitted = np.zeros((len(codes), wanted.shape[1]), dtype=np.int64)
                width = min(codes.shape[1], wanted.shape[1])
                fitted[:, :width] = codes[:, :width]
                codes = fitted
            out[name] = codes
        out.update({name: part.dense[:, i] for i, name in enumerate(dense_names)})
        return out

    with contextlib.redirect_stdout(io.StringIO()):  # it prints its device
        model = DCN(columns, columns, cross_num=3, cross_parameterization="matrix", dnn_hidden_units=HIDDEN,
                    dnn_dropout=0.3, dnn_use_bn=True, seed=seed, device="cpu")  # fmt: skip
    model.compile("adam", "binary_crossentropy")
    x = {name: inputs(splits[name]) for name in ("train", "valid", "test")}
    best, best_auc, best_epoch, train_seconds, epochs = None, -1.0, 0, 0.0, 0
    for epoch in range(1, MAX_EPOCHS + 1):
        started = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # and a line for each call of fit
            model.fit(x["train"], splits["train"].labels, batch_size=BATCH_SIZE, epochs=1, verbose=0)
        train_seconds += time.perf_counter() - started
        epochs = epoch
        auc = roc_auc_score(splits["valid"].labels, model.predict(x["valid"], 4096).ravel())
        if auc > best_auc:
            best, best_auc, best_epoch = copy.deepcopy(model.state_dict()), auc, epoch
        elif epoch - best_epoch >= PATIENCE:
            break
    model.load_state_dict(best)
    scores = model.predict(x["test"], 4096).ravel()
    embedding_params = sum(p.numel() for n, p in model.named_parameters() if n.startswith("embedding_dict"))
    return _result("deepctr-torch DCN (parallel)", splits, best_auc, scores, best_epoch, epochs, train_seconds,
                   embedding_params)  # fmt: skip


def train_fuxictr(data: CTRData, splits: dict[str, Coded], vocab: dict[str, np.ndarray], seed: int) -> dict:
    """A stacked DCNv2 made of FuxiCTR's layers, trained by FuxiCTR's `BaseModel.fit`.

    The pip package holds FuxiCTR's layers and training loop; its model zoo (where its DCNv2
    lives) is not packaged, so the model here is assembled from `FeatureEmbedding`,
    `CrossNetV2` and `MLP_Block`. Its loop also cuts the learning rate tenfold at each epoch
    without a validation gain.
    """
    from fuxictr.features import FeatureMap
    from fuxictr.pytorch.layers import CrossNetV2, FeatureEmbedding, MLP_Block
    from fuxictr.pytorch.models import BaseModel
    from fuxictr.pytorch.torch_utils import seed_everything

    seed_everything(seed)
    with tempfile.TemporaryDirectory(prefix="fuxictr-") as workdir:  # removed on errors too
        feature_map = FeatureMap("peers", workdir)
        feature_map.labels, feature_map.default_emb_dim = ["label"], EMBEDDING_DIM
        for feature in data.features:
            if feature.kind is FeatureKind.CATEGORICAL:
                spec = {"type": "categorical", "vocab_size": len(vocab[feature.name]) + 1}
            elif feature.kind is FeatureKind.MULTIVALENT:
                pooling = "MaskedAveragePooling" if feature.pooling.value == "mean" else "MaskedSumPooling"
                spec = {"type": "sequence", "vocab_size": len(vocab[feature.name]) + 2, "padding_idx": 0,
                        "max_len": splits["train"].columns[feature.name].shape[1],
                        "feature_encoder": f"layers.{pooling}()"}  # fmt: skip
            else:
                spec = {"type": "numeric"}
            feature_map.features[feature.name] = {"source": "", **spec}
        feature_map.num_fields = feature_map.get_num_fields()
        dense_names = [f.name for f in data.features if f.kind is FeatureKind.DENSE]
        eval_seconds = [0.0]

        class StackedDCNv2(BaseModel):
            def __init__(self) -> None:
                super().__init__(
                    feature_map, model_id="DCNv2", verbose=0, model_root=workdir, metrics=["AUC", "logloss"]
                )
                self.embedding = FeatureEmbedding(feature_map, EMBEDDING_DIM)
                width = feature_map.sum_emb_out_dim()
                self.cross = CrossNetV2(width, 3)
                self.mlp = MLP_Block(width, hidden_units=list(HIDDEN), output_dim=1, dropout_rates=0.3, batch_norm=True)
                self.compile("adam", "binary_crossentropy", 1e-3)
                self.reset_parameters()

            def forward(self, inputs):
                features = self.embedding(self.get_inputs(inputs), flatten_emb=True)
                return {"y_pred": self.output_activation(self.mlp(self.cross(features)))}

            def eval_step(self):
                started = time.perf_counter()
                super().eval_step()
                eval_seconds[0] += time.perf_counter() - started

        class Batches:
            """What FuxiCTR's loop takes: a sized iterable of dicts of tensors, reshuffled each pass when training."""

            def __init__(self, part: Coded, train: bool) -> None:
                self.columns = {name: torch.from_numpy(codes) for name, codes in part.columns.items()}
                self.columns |= {name: torch.from_numpy(part.dense[:, i].copy()) for i, name in enumerate(dense_names)}
                self.columns["label"] = torch.from_numpy(part.labels)
                self.rows, self.train = len(part.labels), train
                self.size = BATCH_SIZE if train else 4096
                self.rng = np.random.default_rng(seed)

            def __len__(self) -> int:
                return math.ceil(self.rows / self.size)

            def __iter__(self):
                order = torch.from_numpy(self.rng.permutation(self.rows)) if self.train else torch.arange(self.rows)
                for i in range(0, self.rows, self.size):
                    yield {name: column[order[i : i + self.size]] for name, column in self.columns.items()}

        model = StackedDCNv2()
        Path(model.model_dir).mkdir(parents=True)  # where fit keeps the best epoch's weights
        started = time.perf_counter()
        model.fit(Batches(splits["train"], True), epochs=MAX_EPOCHS, validation_data=Batches(splits["valid"], False))
        train_seconds = time.perf_counter() - started - eval_seconds[0]
        epochs = model._epoch_index + 1
        scores = model.predict(Batches(splits["test"], False))
        embedding_params = sum(p.numel() for p in model.embedding.parameters())
    return _result("FuxiCTR layers + BaseModel.fit, DCNv2 (stacked)", splits, model._best_metric, scores,
                   epochs - model._stopping_steps, epochs, train_seconds, embedding_params)  # fmt: skip


def train_ours(dataset: str, data_dir: str, method: str, budget: str, seed: int) -> dict:
    config = TrainConfig(dataset=dataset, method=method, budget=budget, seed=seed, data_dir=data_dir)
    result = Trainer(config, progress=False).run()
    return {
        "library": f"unified-embedding DCNv2 (stacked), {method} {budget}",
        "val_auc": result["val_auc"], "test_auc": result["test_auc"], "test_logloss": result["test_logloss"],
        "best_epoch": result["best_epoch"], "epochs_run": result["epochs_run"],
        "train_seconds": result["train_seconds"], "embedding_params": result["num_embedding_params"],
    }  # fmt: skip


def _result(library, splits, val_auc, scores, best_epoch, epochs, train_seconds, embedding_params) -> dict:
    labels = splits["test"].labels
    return {
        "library": library, "val_auc": float(val_auc), "test_auc": float(roc_auc_score(labels, scores)),
        "test_logloss": float(log_loss(labels, np.clip(scores, 1e-7, 1 - 1e-7))), "best_epoch": best_epoch,
        "epochs_run": epochs, "train_seconds": train_seconds, "embedding_params": int(embedding_params),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--datasets", default="movielens-100k,frappe")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds (the split stays split seed 0)")
    parser.add_argument("--output", default="benchmarks/results/peers.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for dataset in args.datasets.split(","):
        data = load_dataset(dataset, args.data_dir)
        split = split_indices(data, seed=0)
        vocab = vocabularies(data, split.train)
        splits = {name: code_split(data, getattr(split, name), vocab) for name in ("train", "valid", "test")}
        for seed in map(int, args.seeds.split(",")):
            runs = [train_ours(dataset, args.data_dir, "full", "1x", seed),
                    train_ours(dataset, args.data_dir, "unified", "0.25x", seed),
                    train_deepctr(data, splits, vocab, seed), train_fuxictr(data, splits, vocab, seed)]  # fmt: skip
            for run in runs:
                rows.append({"dataset": dataset, "seed": seed, **run})
                print(json.dumps(rows[-1]), flush=True)
    print("\n| dataset | library and model | embedding params | seeds | val AUC | test AUC | test log loss | "
          "best epoch | s / epoch |\n|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    groups: dict[tuple[str, str], list[dict]] = {}
    for row in rows:
        groups.setdefault((row["dataset"], row["library"]), []).append(row)
    for (dataset, library), group in groups.items():
        print(f"| {dataset} | {library} | {group[0]['embedding_params']:,} | {len(group)} | "
              f"{mean_se([r['val_auc'] for r in group])} | {mean_se([r['test_auc'] for r in group])} | "
              f"{mean_se([r['test_logloss'] for r in group])} | {statistics.mean(r['best_epoch'] for r in group):.1f} | "
              f"{statistics.mean(r['train_seconds'] / r['epochs_run'] for r in group):.1f} |")  # fmt: skip
    write_runs(args, rows)


if __name__ == "__main__":
    main()
