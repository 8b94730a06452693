"""int8/int4 row storage of the table methods: round trip, straight-through gradients, bytes, byte budgets."""

import math

import numpy as np
import pytest
import torch
from test_embeddings import FEATURES, FULL_SIZE, VOCABULARIES, make_batch

from unified_embedding import Batch, FeatureSet, FeatureSpec
from unified_embedding.embeddings import METHODS, FullEmbedding, UnifiedEmbedding, build_embedding
from unified_embedding.embeddings.quantization import (
    dequantize_rows,
    fake_quantize_rows,
    largest_code,
    quantize_rows,
    table_bytes,
)
from unified_embedding.embeddings.table import SlotTableEmbedding

# every method stored as rows of one table takes `storage`; pep prunes float32 weights instead
TABLE_METHODS = sorted(name for name, cls in METHODS.items() if issubclass(cls, SlotTableEmbedding) and cls.quantisable)


@pytest.mark.parametrize("storage", ["int8", "int4"])
def test_rows_round_trip_within_half_a_step(storage):
    rows = torch.randn(2000, 12) * torch.logspace(-3, 1, 2000)[:, None]  # rows of very different scales
    rows[7] = 0.0
    codes, scales = quantize_rows(rows, storage)
    q = largest_code(storage)
    assert codes.dtype == torch.int8 and int(codes.abs().max()) == q  # each row's largest value uses the top code
    assert torch.allclose(scales, rows.abs().amax(1) / q)
    back = dequantize_rows(codes, scales)
    assert ((back - rows).abs() <= scales[:, None] / 2 * (1 + 1e-6)).all()
    assert torch.equal(back[7], torch.zeros(12))  # an all-zero row stays exactly zero
    assert len(torch.unique(codes)) == 2 * q + 1  # the whole symmetric code range is used


@pytest.mark.parametrize("storage", ["int8", "int4"])
def test_fake_quantisation_is_straight_through(storage):
    rows = torch.randn(10, 8, requires_grad=True)
    upstream = torch.randn(10, 8)
    out = fake_quantize_rows(rows, storage)
    assert torch.equal(out, dequantize_rows(*quantize_rows(rows, storage)))
    assert not torch.equal(out, rows)
    (out * upstream).sum().backward()
    assert torch.equal(rows.grad, upstream)  # rounding is the identity for the backward


def test_quantised_table_reads_stored_rows_and_trains_like_fp32():
    batch = make_batch(32)
    fp32 = UnifiedEmbedding(FEATURES, num_rows=40, chunk_dim=4)
    int8 = UnifiedEmbedding(FEATURES, num_rows=40, chunk_dim=4, storage="int8")
    int8.load_state_dict(fp32.state_dict())
    # forward: what a deployment reads (the stored int8 rows), pooled exactly like fp32 rows
    stored = UnifiedEmbedding(FEATURES, num_rows=40, chunk_dim=4)
    with torch.no_grad():
        stored.weight.copy_(dequantize_rows(*quantize_rows(fp32.weight, "int8")))
    assert torch.allclose(int8(batch), stored(batch), atol=1e-6)
    assert not torch.allclose(int8(batch), fp32(batch))
    # backward: straight through, so the master rows get fp32's gradient
    upstream = torch.randn(32, fp32.output_dim)
    (fp32(batch) * upstream).sum().backward()
    (int8(batch) * upstream).sum().backward()
    assert torch.allclose(int8.weight.grad, fp32.weight.grad, atol=1e-6)


def test_quantised_sparse_gradients_touch_only_looked_up_rows():
    ue = UnifiedEmbedding(FEATURES, num_rows=1000, chunk_dim=4, sparse=True, storage="int4")
    batch = make_batch()
    ue(batch).sum().backward()
    assert ue.weight.grad.is_sparse
    rows, _, _ = ue.slot_rows(batch)
    assert set(ue.weight.grad.coalesce().indices()[0].tolist()) <= set(rows.tolist())


def test_num_bytes_formula():
    for values, rows in [(800, 100), (21, 7), (1, 1)]:
        assert table_bytes(values, rows, "fp32") == 4 * values
        assert table_bytes(values, rows, "int8") == values + 4 * rows
        assert table_bytes(values, rows, "int4") == math.ceil(values / 2) + 4 * rows
    assert UnifiedEmbedding(FEATURES, num_rows=101, chunk_dim=8, storage="int4").num_bytes() == 101 * 4 + 101 * 4
    assert UnifiedEmbedding(FEATURES, num_rows=101, chunk_dim=8, storage="int8").num_bytes() == 101 * 8 + 101 * 4
    assert UnifiedEmbedding(FEATURES, num_rows=101, chunk_dim=8).num_bytes() == 4 * 101 * 8
    # float32 extras beside the table (mixed_dim's projections) count 4 bytes each; one scale per feature row
    md = build_embedding("mixed_dim", FEATURES, FULL_SIZE // 4, vocabularies=VOCABULARIES, storage="int8")
    vocabulary_rows = sum(len(v) + 1 for v in VOCABULARIES.values())
    assert md.num_bytes() == md.weight.numel() + 4 * vocabulary_rows + 4 * md.projection.numel()


def test_chunks_of_one_feature_row_share_its_scale():
    features = FeatureSet([FeatureSpec("user", dim=12), FeatureSpec("gender", dim=4)])
    vocab = {"user": np.arange(10), "gender": np.arange(2)}
    full = FullEmbedding(features, vocab, storage="int8")
    assert full.chunk_dim == 4 and full.num_wide_rows == 11 + 3  # user rows are 3 chunks under one scale
    assert full.num_bytes() == (11 * 12 + 3 * 4) + 4 * (11 + 3)
    with torch.no_grad():
        full.weight.uniform_(-1, 1)
    batch = Batch.from_ids({"user": torch.tensor([3, 4, 99]), "gender": torch.tensor([0, 1, 0])})
    out = full(batch)
    rows, _, slot_of = full.slot_rows(batch)
    user_rows = full.weight[rows[slot_of < 3].view(3, 3)].permute(1, 0, 2).reshape(3, 12)  # [example, 12]
    stored = dequantize_rows(*quantize_rows(user_rows, "int8"))
    assert torch.allclose(out[:, :12], stored, atol=1e-6)


@pytest.mark.parametrize("storage", ["int8", "int4"])
@pytest.mark.parametrize("name", TABLE_METHODS)
@pytest.mark.parametrize("fraction", [0.1, 0.3, 1.0])
def test_byte_budget_is_four_bytes_per_parameter(name, storage, fraction):
    budget = int(FULL_SIZE * fraction)
    method = build_embedding(name, FEATURES, budget, vocabularies=VOCABULARIES, storage=storage)
    assert method.storage == storage
    assert method.num_bytes() <= 4 * budget
    if name != "mixed_dim" or fraction < 0.3:  # mixed_dim at >= 0.3x is already `full`, its largest
        assert method.num_parameters() > budget  # the bytes buy more values than fp32 would
    if name in ("hashing", "multiplexed", "unified"):  # fixed row width: less than a row per feature unused
        row_bytes = table_bytes(method.chunk_dim, 1, storage)
        assert 4 * budget - method.num_bytes() < row_bytes * len(FEATURES.sparse)
    assert method(make_batch()).shape == (6, method.output_dim)


def test_unified_int8_at_budget_fits_in_bytes_exactly():
    budget = 10_000
    ue = build_embedding("unified", FEATURES, budget, storage="int8")
    assert ue.chunk_dim == 8 and ue.num_rows == 4 * budget // (8 + 4)  # 8 one-byte codes + a 4-byte scale per row
    assert ue.num_bytes() <= 4 * budget


def test_bad_storage_is_refused():
    with pytest.raises(ValueError, match="storage"):
        UnifiedEmbedding(FEATURES, num_rows=10, storage="int2")
    with pytest.raises(ValueError, match="storage"):
        build_embedding("unified", FEATURES, 1000, storage="fp16")


def test_quantised_empty_bags_stay_zero():
    ue = UnifiedEmbedding(FEATURES, num_rows=10, storage="int8")
    out = ue(Batch.from_ids({"user": [[1]], "item": [[2]], "genres": [[]], "gender": [[11]]}))
    assert torch.equal(out[0, ue.feature_slices()["genres"]], torch.zeros(16))
    assert bool((out[0, ue.feature_slices()["user"]] != 0).any())  # (a small weight may round to code 0)
