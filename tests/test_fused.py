"""The fused sparse update gives the reference optimizers' numbers, and plugs into training."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
import torch.nn.functional as F

from unified_embedding import fused
from unified_embedding.batch import Batch
from unified_embedding.embeddings import build_embedding
from unified_embedding.features import FeatureKind, FeatureSet, FeatureSpec, Pooling
from unified_embedding.fused import RowOptimizer, fused_embedding_bag, reduce_row_gradients

REFERENCES = {
    "sgd": lambda p: torch.optim.SGD([p], lr=0.1),
    "adagrad": lambda p: torch.optim.Adagrad([p], lr=0.1),
    "adam": lambda p: torch.optim.SparseAdam([p], lr=0.01),
}


def _lookups(generator: torch.Generator, num_rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """300 lookups of only 40 distinct rows (so ids repeat within and across bags), 5 bags, one empty."""
    rows = torch.randint(0, 40, (300,), generator=generator) * (num_rows // 40)
    offsets = torch.tensor([0, 90, 90, 200, 260, 300])
    weights = torch.rand(300, generator=generator, dtype=torch.float64)
    return rows, offsets, weights


def _train_fused_and_reference(kind: str, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Six steps of the fused update and of torch's optimizer on the same lookups: start, fused, reference."""
    generator = torch.Generator().manual_seed(0)
    start = torch.randn(1000, 8, generator=generator, dtype=dtype)
    fused_table, reference_table = start.clone().requires_grad_(), start.clone().requires_grad_()
    reference = REFERENCES[kind](reference_table)
    optimizer = RowOptimizer(kind, fused_table, lr=reference.defaults["lr"])
    for _ in range(6):
        rows, offsets, weights = _lookups(generator, 1000)
        weights, target = weights.to(dtype), torch.randn(5, 8, generator=generator, dtype=dtype)
        ((fused_embedding_bag(rows, offsets, optimizer, weights) - target) ** 2).sum().backward()
        reference.zero_grad()
        pooled = F.embedding_bag(
            rows, reference_table, offsets, mode="sum", per_sample_weights=weights, include_last_offset=True,
            sparse=kind != "sgd",
        )  # fmt: skip
        ((pooled - target) ** 2).sum().backward()
        reference.step()
    assert fused_table.grad is None  # the update happened in backward; nothing left for an optimizer
    return start, fused_table.detach(), reference_table.detach()


@pytest.mark.parametrize("kind", sorted(REFERENCES))
def test_fused_update_matches_the_torch_optimizer(kind: str) -> None:
    """float64: the torch path of the step, element by element."""
    start, fused_table, reference_table = _train_fused_and_reference(kind, torch.float64)
    assert not torch.equal(fused_table, start)
    relative = (fused_table - reference_table).abs() / reference_table.abs().clamp(min=1e-12)
    assert relative.max().item() < 1e-6


def test_rowwise_adagrad_keeps_one_accumulator_per_row() -> None:
    table = torch.randn(50, 4, dtype=torch.float64).requires_grad_()
    expected = table.detach().clone()
    optimizer = RowOptimizer("rowwise_adagrad", table, lr=0.5)
    accumulator = torch.zeros(50, dtype=torch.float64)
    for step in range(3):
        rows = torch.tensor([3, 7, 3, 49, 3])
        grads = torch.full((5, 4), float(step + 1), dtype=torch.float64) * torch.arange(1, 5)
        unique, summed = reduce_row_gradients(rows, torch.arange(6), grads)
        optimizer.update(unique, summed)
        for row in (3, 7, 49):
            g = grads[rows == row].sum(0)
            accumulator[row] += (g * g).mean()
            expected[row] -= 0.5 * g / (accumulator[row].sqrt() + 1e-10)
    assert optimizer.state["sum"].shape == (50,)
    torch.testing.assert_close(table.detach(), expected, rtol=1e-12, atol=1e-12)


def test_row_gradients_are_summed_per_unique_row() -> None:
    rows = torch.tensor([5, 2, 5, 5, 9])
    offsets = torch.tensor([0, 2, 5])  # bag 0 = lookups 0,1; bag 1 = lookups 2,3,4
    grad_bags = torch.tensor([[1.0, 10.0], [100.0, 1000.0]])
    unique, grads = reduce_row_gradients(rows, offsets, grad_bags, torch.tensor([1.0, 1.0, 2.0, 3.0, 1.0]))
    assert unique.tolist() == [2, 5, 9]
    assert grads.tolist() == [[1.0, 10.0], [501.0, 5010.0], [100.0, 1000.0]]


def test_state_round_trips_through_state_dict() -> None:
    table = torch.randn(20, 3).requires_grad_()
    optimizer = RowOptimizer("adam", table, lr=0.01, weight_decay=0.1)
    optimizer.update(torch.tensor([1, 4]), torch.ones(2, 3))
    restored = RowOptimizer("adam", torch.zeros(20, 3), lr=0.5, weight_decay=0.1)
    restored.load_state_dict(optimizer.state_dict())
    assert restored.steps == 1 and restored.lr == 0.01
    torch.testing.assert_close(restored.state["exp_avg"], optimizer.state["exp_avg"])
    assert restored.last_step[[1, 4]].tolist() == [1, 1] and restored.last_step.sum() == 2
    with pytest.raises(ValueError, match="adagrad"):
        RowOptimizer("adagrad", torch.zeros(20, 3), lr=0.1).load_state_dict(optimizer.state_dict())


@pytest.mark.parametrize("kernel", [True, False])
def test_weight_decay_counts_the_steps_a_row_skipped(kernel: bool, monkeypatch) -> None:
    if not kernel:
        monkeypatch.setattr(fused, "KERNELS", None)
    table = torch.ones(3, 2)
    optimizer = RowOptimizer("sgd", table, lr=0.5, weight_decay=0.1)
    for rows in ([0, 1], [0], [0], [0, 1]):  # row 1 skips steps 2 and 3; row 2 is never touched
        optimizer.update(torch.tensor(rows), torch.zeros(len(rows), 2))
    expected_row_1 = 0.95 - 0.5 * (0.1 * 3 * 0.95)  # step 1: 1 - 0.5 * 0.1; step 4: three steps of L2 at once
    torch.testing.assert_close(table[1], torch.full((2,), expected_row_1))
    torch.testing.assert_close(table[2], torch.ones(2))
    assert optimizer.last_step.tolist() == [4, 4, 0]
    optimizer.reset_rows(torch.tensor([2]))  # a row handed to a new id owes no decay from before
    assert optimizer.last_step.tolist() == [4, 4, 4]


def test_bad_row_optimizer_settings_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown row optimizer"):
        RowOptimizer("lion", torch.zeros(2, 2), lr=0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="lr must be positive"):
        RowOptimizer("sgd", torch.zeros(2, 2), lr=0.0)


def _features() -> FeatureSet:
    return FeatureSet(
        [
            FeatureSpec("user", cardinality=100),
            FeatureSpec("tags", FeatureKind.MULTIVALENT, pooling=Pooling.MEAN, cardinality=30),
        ]
    )


def _multivalent_batch() -> Batch:
    return Batch.from_ids(
        {"user": [[1], [2], [1]], "tags": [[3, 4], [], [4, 4, 5]]}, labels=torch.tensor([1.0, 0.0, 1.0])
    )


def _single_valued_batch() -> Batch:  # one id per feature and example: the forward's and backward's fast path
    return Batch.from_ids({"user": [[1], [2], [1]], "tags": [[3], [4], [3]]}, labels=torch.tensor([1.0, 0.0, 1.0]))


@pytest.mark.parametrize("make_batch", [_multivalent_batch, _single_valued_batch])
def test_a_fused_unified_table_trains_like_the_unfused_one_with_sgd(make_batch) -> None:
    torch.manual_seed(0)
    _batch = make_batch
    assert _batch().single_valued == (make_batch is _single_valued_batch)
    fused = build_embedding("unified", _features(), 400)
    plain = build_embedding("unified", _features(), 400)
    plain.load_state_dict(fused.state_dict())
    fused.fuse_optimizer("sgd", lr=0.3)
    sgd = torch.optim.SGD(plain.parameters(), lr=0.3)
    target = torch.randn(3, fused.output_dim)
    for _ in range(3):
        ((fused(_batch()) - target) ** 2).sum().backward()
        sgd.zero_grad()
        ((plain(_batch()) - target) ** 2).sum().backward()
        sgd.step()
    torch.testing.assert_close(fused.weight.detach(), plain.weight.detach(), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(fused(_batch()), plain(_batch()))


@pytest.mark.parametrize(("method", "options"), [("unified", {"storage": "int8"}), ("qr", {})])
def test_methods_without_a_plain_table_refuse_the_fused_update(method: str, options: dict) -> None:
    embedding = build_embedding(method, _features(), 400, **options)
    with pytest.raises(ValueError, match="fused update"):
        embedding.fuse_optimizer("adagrad", lr=0.1)


@pytest.mark.parametrize("kind", sorted(REFERENCES))
def test_the_c_step_matches_the_torch_optimizer_in_float32(kind: str, monkeypatch) -> None:
    """The C kernel (float32 tables on a CPU), split across threads, against torch's own optimizer.

    In float32 the two sum a row's gradients in different orders, so they differ by an ulp
    or two of the table's values (the torch path of fused.py differs exactly as much): the
    bound is 1e-6 of the table's largest value, not of each element, which may be near 0.
    """
    assert fused.KERNELS is not None, "the C kernels were not built at install (no C compiler?)"
    monkeypatch.setattr(fused, "_ROWS_PER_THREAD", 8)  # split even these few rows across threads
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    start, fused_table, reference_table = _train_fused_and_reference(kind, torch.float32)
    moved = (start - reference_table).abs() > 0
    assert moved.any() and torch.equal(moved, (start - fused_table).abs() > 0)
    error = (fused_table - reference_table).abs().max() / reference_table.abs().max()
    assert error.item() < 1e-6


@pytest.mark.parametrize("kind", ["sgd", "adagrad", "rowwise_adagrad", "adam"])
def test_the_c_step_and_the_torch_step_agree(kind: str, monkeypatch) -> None:
    generator = torch.Generator().manual_seed(1)
    tables = [torch.randn(500, 16, generator=generator)] * 2
    tables = [t.clone().requires_grad_() for t in tables]
    optimizers = [RowOptimizer(kind, t, lr=0.05, weight_decay=0.001) for t in tables]
    monkeypatch.setattr(fused, "_ROWS_PER_THREAD", 16)
    for _ in range(5):
        rows = torch.randperm(500, generator=generator)[:200]
        grads = torch.randn(200, 16, generator=generator)
        optimizers[0].update(rows, grads.clone())
        with monkeypatch.context() as patch:
            patch.setattr(fused, "KERNELS", None)
            optimizers[1].update(rows, grads.clone())
    torch.testing.assert_close(tables[0], tables[1], rtol=1e-6, atol=1e-7)
    for name in optimizers[0].state:
        torch.testing.assert_close(optimizers[0].state[name], optimizers[1].state[name], rtol=1e-6, atol=1e-7)


def test_the_c_step_still_runs_in_a_forked_child(monkeypatch) -> None:
    """A child forked after a threaded step inherits the thread pool object but not its threads."""
    monkeypatch.setattr(fused, "_ROWS_PER_THREAD", 16)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    optimizer = RowOptimizer("adagrad", torch.randn(1000, 8), lr=0.1)
    for _ in range(3):  # let the pool start both its threads
        optimizer.update(torch.arange(0, 1000, 3), torch.randn(334, 8))
    pid = os.fork()
    if pid == 0:  # the child: one threaded step, then out without pytest's cleanup
        optimizer.update(torch.arange(0, 1000, 3), torch.randn(334, 8))
        os._exit(0)
    deadline = time.monotonic() + 60
    while (done := os.waitpid(pid, os.WNOHANG)) == (0, 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    if done == (0, 0):
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        pytest.fail("the forked child's step never finished")
    assert os.waitstatus_to_exitcode(done[1]) == 0
