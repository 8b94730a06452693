"""CounterDropout: nn.Dropout's distribution with a SplitMix64 mask, the C kernel and torch giving the same bits."""

from __future__ import annotations

import pytest
import torch

from unified_embedding.hashing import splitmix64_outputs
from unified_embedding.models import dropout
from unified_embedding.models.dropout import CounterDropout, dropout_mask


def test_splitmix64_outputs_match_the_reference_generator():
    # SplitMix64 (Steele, Lea & Flood 2014) seeded with 0: its first two outputs, as the reference C prints them
    first_two = [int(v) % 2**64 for v in splitmix64_outputs(0, 2)]
    assert first_two == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]


@pytest.mark.parametrize("p", [0.3, 0.5, 0.01])
def test_c_kernel_and_torch_path_give_the_same_mask(monkeypatch, p):
    assert dropout.KERNELS is not None, "the C kernels were not built at install (no C compiler?)"
    for shape in [(1024, 400), (3, 5, 7), (0, 4)]:
        torch.manual_seed(11)
        fast = dropout_mask(torch.Size(shape), p)
        with monkeypatch.context() as patch:
            patch.setattr(dropout, "KERNELS", None)
            torch.manual_seed(11)
            reference = dropout_mask(torch.Size(shape), p)
        assert fast.shape == shape and fast.dtype == torch.float32
        assert torch.equal(fast, reference), (shape, p)


def test_mask_keeps_one_minus_p_unbiased_and_uncorrelated():
    p, n = 0.3, 1_000_000
    torch.manual_seed(0)
    mask = dropout_mask(torch.Size([n]), p)
    kept = (mask > 0).double()
    assert mask.unique().tolist() == pytest.approx([0.0, 1 / (1 - p)])
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(kept.mean().item() - (1 - p)) < 5 * sigma
    assert abs(mask.double().mean().item() - 1.0) < 5 * sigma / (1 - p)  # E[x * mask] = x
    neighbours = torch.corrcoef(torch.stack([kept[:-1], kept[1:]]))[0, 1].item()
    assert abs(neighbours) < 5 / n**0.5


def test_seeded_by_torch_and_fresh_on_every_call():
    torch.manual_seed(3)
    first, second = dropout_mask(torch.Size([1000]), 0.3), dropout_mask(torch.Size([1000]), 0.3)
    torch.manual_seed(3)
    assert torch.equal(first, dropout_mask(torch.Size([1000]), 0.3))
    assert not torch.equal(first, second)


def test_module_drops_in_training_only_and_its_gradient_is_the_mask():
    layer = CounterDropout(0.4)
    x = torch.randn(64, 32, requires_grad=True)
    torch.manual_seed(5)
    y = layer(x)
    torch.manual_seed(5)
    mask = dropout_mask(x.shape, 0.4)
    torch.testing.assert_close(y, x * mask)
    y.sum().backward()
    torch.testing.assert_close(x.grad, mask)
    assert layer.eval()(x) is x
    assert CounterDropout(0.0).train()(x) is x
    assert layer.train()(x.double()).dtype == torch.float64
