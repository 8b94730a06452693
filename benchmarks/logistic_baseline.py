"""The floors' reference point: scikit-learn's one-hot logistic regression on this library's split.

The method issues set their AUC floors at "logistic regression on the same split". This script
measures it, so that the floor's value and its size (one weight per one-hot column) are known
rather than quoted. Each categorical value seen in training gets a column, plus one column per
feature for everything else (the same vocabulary `full` uses); a multivalent feature is
multi-hot; dense features are standardised on training rows. The inverse regularisation
strength C is chosen on validation AUC, and the test split is scored once with that C.

    python benchmarks/logistic_baseline.py --data-dir ../shared/datasets
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import scipy.sparse as sp
from peers import Coded, code_split
from sklearn.linear_model import LogisticRegression

from unified_embedding.metrics import split_metrics
from unified_embedding.train import TrainConfig, prepare

C_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)


def one_hot(part: Coded, widths: dict[str, int], dense_mean: np.ndarray, dense_std: np.ndarray) -> sp.csr_matrix:
    """Columns: each feature's codes (multi-hot for lists, padding code 0 dropped), then dense."""
    blocks = []
    for name, codes in part.columns.items():
        rows = len(codes)
        if codes.ndim == 1:
            blocks.append(sp.csr_matrix((np.ones(rows), (np.arange(rows), codes)), shape=(rows, widths[name])))
        else:
            row, position = np.nonzero(codes)
            blocks.append(
                sp.csr_matrix((np.ones(len(row)), (row, codes[row, position] - 1)), shape=(rows, widths[name]))
            )
    if part.dense.shape[1]:
        blocks.append(sp.csr_matrix((part.dense - dense_mean) / dense_std))
    return sp.hstack(blocks, format="csr")


def baseline(dataset: str, data_dir: str) -> dict:
    prepared = prepare(TrainConfig(dataset=dataset, data_dir=data_dir))
    data, split, vocab = prepared.data, prepared.split, prepared.vocabularies
    splits = {name: code_split(data, getattr(split, name), vocab) for name in ("train", "valid", "test")}
    widths = {name: len(vocab[name]) + 1 for name in splits["train"].columns}
    mean = splits["train"].dense.mean(axis=0)
    std = splits["train"].dense.std(axis=0) + 1e-6
    x = {name: one_hot(part, widths, mean, std) for name, part in splits.items()}
    y = {name: part.labels for name, part in splits.items()}
    by_c = {}
    for c in C_GRID:
        model = LogisticRegression(C=c, max_iter=2000).fit(x["train"], y["train"])
        by_c[c] = (split_metrics(y["valid"], model.predict_proba(x["valid"])[:, 1])["auc"], model)
    best_c = max(by_c, key=lambda c: by_c[c][0])
    val_auc, model = by_c[best_c]
    test = split_metrics(y["test"], model.predict_proba(x["test"])[:, 1])
    weights = x["train"].shape[1] + 1
    return {"dataset": dataset, "C": best_c, "val_auc_by_C": {c: round(a, 4) for c, (a, _) in by_c.items()},
            "val_auc": val_auc, "test_auc": test["auc"], "test_logloss": test["logloss"],
            "weights": weights, "full_embedding_params": prepared.full_parameters,
            "weights_over_0.1x_budget": weights / (0.1 * prepared.full_parameters)}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--datasets", default="movielens-100k,frappe,criteo,avazu,movielens-1m")
    args = parser.parse_args()
    rows = [baseline(dataset, args.data_dir) for dataset in args.datasets.split(",")]
    for row in rows:
        print(json.dumps(row))
    print("\n| dataset | C (on validation) | val AUC | test AUC | test log loss | weights | `full` 1x params | "
          "weights / 0.1x budget |\n|---|---|---|---|---|---|---|---|")  # fmt: skip
    for r in rows:
        print(f"| {r['dataset']} | {r['C']} | {r['val_auc']:.4f} | {r['test_auc']:.4f} | {r['test_logloss']:.4f} | "
              f"{r['weights']:,} | {r['full_embedding_params']:,} | {r['weights_over_0.1x_budget']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
