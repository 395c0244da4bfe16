"""The autoencoder decoder's exact fast vocabulary argmax (the largest cost of a CALM decoding step)."""

import pytest
import torch

from calm.models.autoencoder import SCREEN_MIN_LOGITS, vocab_argmax


@pytest.mark.parametrize("rows", [1, 4, 100, 512])
def test_vocab_argmax_matches_the_full_product(rows: int) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(40_000, 64, generator=gen) * 0.02
    hidden = torch.randn(rows, 64, generator=gen)
    assert torch.equal(vocab_argmax(hidden, weight), (hidden @ weight.t()).argmax(-1))


def test_vocab_argmax_is_exact_on_near_ties() -> None:
    """Rows whose two best logits differ by 1e-4 of their size: bf16 alone picks the wrong one about
    half the time; the fp32 re-check must not (seeded; compared with an fp64 argmax)."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(40_000, 64, generator=gen) * 0.02
    a = torch.randint(0, 40_000, (512,), generator=gen)
    b = (a + torch.randint(1, 40_000, (512,), generator=gen)) % 40_000  # b != a
    h = 20 * (weight[a] + weight[b]).double()
    u = (weight[a] - weight[b]).double()
    target = 1e-4 * (h * weight[a].double()).sum(-1)
    h = (h + ((target - (h * u).sum(-1)) / (u * u).sum(-1))[:, None] * u).float()
    exact = (h.double() @ weight.double().t()).argmax(-1)
    assert 512 * 40_000 >= SCREEN_MIN_LOGITS  # the bf16 screen is used
    assert torch.equal(vocab_argmax(h, weight), exact)


def test_plain_bf16_would_fail_the_near_tie_test() -> None:
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(40_000, 64, generator=gen) * 0.02
    a = torch.randint(0, 40_000, (512,), generator=gen)
    b = (a + torch.randint(1, 40_000, (512,), generator=gen)) % 40_000
    h = 20 * (weight[a] + weight[b]).double()
    u = (weight[a] - weight[b]).double()
    target = 1e-4 * (h * weight[a].double()).sum(-1)
    h = (h + ((target - (h * u).sum(-1)) / (u * u).sum(-1))[:, None] * u).float()
    exact = (h.double() @ weight.double().t()).argmax(-1)
    approx = (h.bfloat16() @ weight.bfloat16().t()).float().argmax(-1)
    print("bf16 agreement", (approx == exact).float().mean())
    assert not torch.equal(approx, exact)
