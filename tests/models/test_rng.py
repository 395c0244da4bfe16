"""One generator per row (``calm.models.rng``): each row of a batch draws what it draws alone, and the token
sampler draws from the distribution it is given."""

import pytest
import torch

from calm.models import rng


def gens(*seeds: int) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(s) for s in seeds]


@pytest.mark.parametrize("fn", [torch.rand, torch.randn])
def test_draw_with_a_generator_per_row_equals_each_row_alone(fn) -> None:
    together = rng.draw(fn, (5, 3, 7), gens(1, 2, 3), "cpu")
    for b, seed in enumerate((1, 2, 3)):
        assert torch.equal(together[:, b : b + 1], fn((5, 1, 7), generator=torch.Generator().manual_seed(seed)))
    with pytest.raises(ValueError, match="2 generators for 3 rows"):
        rng.draw(fn, (5, 3, 7), gens(1, 2), "cpu")


def test_categorical_draws_each_row_as_alone_and_follows_the_probabilities() -> None:
    probs = torch.softmax(torch.randn(3, 1000, generator=torch.Generator().manual_seed(0)), -1)
    together = rng.categorical(probs, gens(4, 5, 6))
    alone = [rng.categorical(probs[b : b + 1], gens(s)[0]) for b, s in enumerate((4, 5, 6))]
    assert torch.equal(together, torch.cat(alone))
    q = torch.tensor([0.1, 0.0, 0.6, 0.3, 0.0])
    draws = rng.categorical(q.expand(40_000, 5), torch.Generator().manual_seed(1))
    freq = torch.bincount(draws, minlength=5).double() / draws.numel()
    assert freq[1] == 0 and freq[4] == 0  # probability 0 is never drawn, the last id included
    torch.testing.assert_close(freq, q.double(), atol=0.01, rtol=0)  # 4+ standard errors apart at most
    unnormalised = rng.categorical(3 * q[None], torch.Generator().manual_seed(2))
    assert unnormalised.item() in (0, 2, 3)


def test_multinomial_and_copy_with_a_generator_per_row() -> None:
    probs = torch.tensor([[0.2, 0.8], [0.5, 0.5], [0.9, 0.1]])
    g = gens(7, 8, 9)
    twin = rng.copy(g)
    assert torch.equal(rng.multinomial(probs, g), rng.multinomial(probs, twin))
    alone = [torch.multinomial(probs[b : b + 1], 1, generator=gens(s)[0]).item() for b, s in enumerate((7, 8, 9))]
    assert rng.multinomial(probs, gens(7, 8, 9)).tolist() == alone
    assert rng.copy(None) is None
