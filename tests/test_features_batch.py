"""FeatureSpec validation and the Batch's KJT layout."""

import pytest
import torch

from unified_embedding import Batch, FeatureSet, FeatureSpec
from unified_embedding.features import FeatureError


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": ""}, "non-empty"),
        ({"name": "x", "kind": "vector"}, "kind must be one of"),
        ({"name": "x", "probes": 0}, "probes must be >= 1"),
        ({"name": "x", "dim": 2.5}, "dim must be an integer"),
        ({"name": "x", "kind": "dense", "probes": 2}, "dense"),
        ({"name": "x", "pooling": "mean"}, "pooling applies to multivalent"),
        ({"name": "x", "kind": "multivalent", "pooling": "max"}, "pooling must be one of"),
    ],
)
def test_bad_specs_name_the_feature_and_reason(kwargs, message):
    with pytest.raises(FeatureError, match=message):
        FeatureSpec(**kwargs)


def test_feature_set_checks_names_and_keeps_order():
    with pytest.raises(FeatureError, match="defined twice"):
        FeatureSet([FeatureSpec("a"), FeatureSpec("a")])
    with pytest.raises(FeatureError, match="at least one categorical"):
        FeatureSet([FeatureSpec("a", kind="dense")])
    fs = FeatureSet([FeatureSpec("d", kind="dense"), FeatureSpec("b"), FeatureSpec("a", kind="multivalent")])
    assert fs.sparse_names == ("b", "a") and fs.dense_names == ("d",)
    with_card = fs.with_cardinalities({"a": 3})
    assert with_card.get("a").cardinality == 3 and with_card.get("b").cardinality is None
    assert FeatureSet.from_config(with_card.to_config()) == with_card
    with pytest.raises(FeatureError, match="unknown features"):
        fs.with_cardinalities({"zzz": 1})


def test_batch_offsets_follow_the_kjt_layout():
    batch = Batch.from_ids({"a": torch.tensor([5, 6, 7]), "b": [[1, 2], [], [3]]}, dense=torch.ones(3, 2))
    assert batch.values.tolist() == [5, 6, 7, 1, 2, 3]
    assert batch.lengths.tolist() == [1, 1, 1, 2, 0, 1]
    assert batch.feature_offsets().tolist() == [[0, 1, 2, 3], [3, 5, 5, 6]]
    assert batch.ids("b").tolist() == [1, 2, 3]


def test_batch_validates_shapes():
    with pytest.raises(ValueError, match="lengths must have"):
        Batch(("a",), torch.tensor([1]), torch.tensor([1, 1]), torch.zeros(1, 0))
    with pytest.raises(ValueError, match="sum to"):
        Batch(("a",), torch.tensor([1, 2]), torch.tensor([1]), torch.zeros(1, 0))
    with pytest.raises(ValueError, match="int64"):
        Batch(("a",), torch.tensor([1.0]), torch.tensor([1]), torch.zeros(1, 0))
    with pytest.raises(ValueError, match="examples, expected"):
        Batch.from_ids({"a": torch.tensor([1, 2]), "b": torch.tensor([1])})


def test_kjt_round_trip_when_torchrec_is_installed():
    pytest.importorskip("torchrec", reason="torchrec is an optional extra (pip install unified-embedding[torchrec])")
    batch = Batch.from_ids({"a": torch.tensor([5, 6]), "b": [[1, 2], []]})
    kjt = batch.to_kjt()
    back = Batch.from_kjt(kjt, batch.dense)
    assert (
        back.keys == batch.keys and torch.equal(back.values, batch.values) and torch.equal(back.lengths, batch.lengths)
    )
