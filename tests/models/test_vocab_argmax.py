"""The autoencoder decoder's exact fast vocabulary argmax (the largest cost of a CALM decoding step)."""

import pytest
import torch

import calm.models.vocab_search as vocab_search
from calm.models.vocab_search import SCREEN_MIN_LOGITS, vocab_argmax


@pytest.mark.parametrize("rows", [1, 4, 100, 512])
def test_vocab_argmax_matches_the_full_product(rows: int) -> None:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(40_000, 64, generator=gen) * 0.02
    hidden = torch.randn(rows, 64, generator=gen)
    assert torch.equal(vocab_argmax(hidden, weight), (hidden @ weight.t()).argmax(-1))


def test_vocab_argmax_is_exact_on_near_ties(monkeypatch: pytest.MonkeyPatch) -> None:
    """Rows whose two best logits differ by 1e-4 of their size: bf16 alone picks the wrong one about
    half the time; the fp32 re-check must not (seeded; compared with an fp64 argmax). The bf16 screen is
    forced on, whatever this CPU's bf16 speed, and the test checks that it ran."""
    gen = torch.Generator().manual_seed(1)
    weight = torch.randn(40_000, 64, generator=gen) * 0.02
    a = torch.randint(0, 40_000, (512,), generator=gen)
    b = (a + torch.randint(1, 40_000, (512,), generator=gen)) % 40_000  # b != a
    h = 20 * (weight[a] + weight[b]).double()
    u = (weight[a] - weight[b]).double()
    target = 1e-4 * (h * weight[a].double()).sum(-1)
    h = (h + ((target - (h * u).sum(-1)) / (u * u).sum(-1))[:, None] * u).float()
    exact = (h.double() @ weight.double().t()).argmax(-1)
    calls = []
    screened = vocab_search.bf16_screened_argmax
    monkeypatch.setattr(vocab_search, "bf16_screened_argmax", lambda *a: calls.append(a) or screened(*a))
    assert torch.equal(vocab_argmax(h, weight, bf16_screen=True), exact)
    assert len(calls) == 1  # 512 rows x 40,000 ids >= SCREEN_MIN_LOGITS: the screen ran
    assert torch.equal(vocab_argmax(h, weight), exact) and len(calls) == 1  # not asked for: the fp32 product


def test_the_bf16_screen_runs_only_from_its_size_on(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    monkeypatch.setattr(vocab_search, "bf16_screened_argmax", lambda *a: calls.append(a) or a[0].new_zeros(0))
    weight = torch.zeros(SCREEN_MIN_LOGITS // 256, 8)
    vocab_argmax(torch.zeros(255, 8), weight, bf16_screen=True)
    assert not calls
    vocab_argmax(torch.zeros(256, 8), weight, bf16_screen=True)
    assert len(calls) == 1
    vocab_argmax(torch.zeros(256, 8, dtype=torch.float64), weight.double(), bf16_screen=True)  # fp32 only
    assert len(calls) == 1


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
