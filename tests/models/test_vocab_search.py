"""The certified int8 vocabulary screen: exact argmaxes (fp32 and bf16 references), near and exact ties."""

from __future__ import annotations

import factories
import pytest
import torch

from calm.hardware import int8_matmul_available
from calm.models.autoencoder import INT8_SCREEN_MIN_VOCAB
from calm.models.vocab_search import Int8Screen

pytestmark = pytest.mark.skipif(not int8_matmul_available(torch.device("cpu")), reason="no int8 matmul on this CPU")


def _table(vocab: int = 40_000, dim: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(vocab, dim, generator=torch.Generator().manual_seed(seed)) * 0.02


@pytest.mark.parametrize("rows", [1, 3, 4, 100, 300])
def test_screen_matches_the_fp32_product(rows: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    weight = _table()
    hidden = torch.randn(rows, 64, generator=gen) * torch.logspace(-2, 2, rows)[:, None]  # norms over 4 decades
    assert torch.equal(Int8Screen(weight).argmax(hidden), (hidden @ weight.t()).argmax(-1))


@pytest.mark.parametrize("rows", [1, 4, 200])
def test_screen_matches_the_bf16_product_bit_for_bit(rows: int) -> None:
    """bf16 logits tie often (8 significant bits): the screen must return the bf16 matmul's argmax."""
    gen = torch.Generator().manual_seed(rows)
    weight = _table().bfloat16()
    hidden = torch.randn(rows, 64, generator=gen).bfloat16()
    logits = hidden @ weight.t()
    reference = logits.argmax(-1)
    if rows == 200:  # the top logit ties in 11 of these rows
        assert ((logits == logits.max(-1, keepdim=True).values).sum(-1) > 1).sum() >= 5
    assert torch.equal(Int8Screen(weight).argmax(hidden), reference)


def _near_ties(weight: torch.Tensor, rows: int, gap: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden rows whose two best logits (ids a, b) differ by ``gap`` of their size, and the fp64 argmax."""
    gen = torch.Generator().manual_seed(seed)
    vocab = weight.shape[0]
    a = torch.randint(0, vocab, (rows,), generator=gen)
    b = (a + torch.randint(1, vocab, (rows,), generator=gen)) % vocab
    h = 20 * (weight[a] + weight[b]).double()
    u = (weight[a] - weight[b]).double()
    target = gap * (h * weight[a].double()).sum(-1)
    h = (h + ((target - (h * u).sum(-1)) / (u * u).sum(-1))[:, None] * u).float()
    return h, (h.double() @ weight.double().t()).argmax(-1)


@pytest.mark.parametrize("gap", [1e-3, 1e-4, -1e-4])
def test_screen_is_exact_on_near_ties(gap: float) -> None:
    """Two logits 1e-4 apart relative: far inside the int8 error, so the fp32 re-score must decide."""
    weight = _table(seed=1)
    hidden, exact = _near_ties(weight, 256, gap, seed=2)
    screen = Int8Screen(weight)
    assert torch.equal(screen.argmax(hidden), exact)
    row, _ = screen.candidates(hidden)
    assert torch.bincount(row, minlength=256).min() >= 2  # both tied ids were in every window


def test_exact_ties_go_to_the_lowest_id() -> None:
    weight = _table(seed=3)
    weight[30_000] = weight[7]  # two identical rows: every logit ties
    weight[12] = weight[39_999]
    hidden = torch.stack([weight[7], weight[12], -weight[5], torch.zeros(64)]) * 50
    expected = (hidden @ weight.t()).argmax(-1)
    assert expected[:2].tolist() == [7, 12] and expected[3] == 0
    assert torch.equal(Int8Screen(weight).argmax(hidden), expected)


def test_screen_computes_few_logits_exactly() -> None:
    """The point of the screen: on random data the certified window holds well under 1% of the ids."""
    weight = _table(vocab=128_000, dim=512)
    hidden = torch.randn(50, 512, generator=torch.Generator().manual_seed(4))
    row, _ = Int8Screen(weight).candidates(hidden)
    assert row.numel() / 50 < 0.01 * 128_000


def test_autoencoder_builds_the_screen_once_and_rebuilds_it_when_the_table_changes() -> None:
    ae = factories.tiny_autoencoder(vocab=INT8_SCREEN_MIN_VOCAB, seed=None).eval()
    screen = ae.vocab_screen()
    assert screen is not None and ae.vocab_screen() is screen
    z = torch.randn(5, 3, 8)
    h = ae.decode_hidden(z)
    assert torch.equal(ae.decode_ids(z), (h @ ae.embed_tokens.weight.t()).argmax(-1))
    with torch.no_grad():
        ae.embed_tokens.weight.mul_(-1)  # in place: the screen must notice
    assert ae.vocab_screen() is not screen
    assert torch.equal(ae.decode_ids(z), (h @ ae.embed_tokens.weight.t()).argmax(-1))
    assert ae.train().vocab_screen() is None


def test_no_rows_give_no_ids() -> None:
    assert Int8Screen(_table()).argmax(torch.zeros(0, 64)).shape == (0,)
