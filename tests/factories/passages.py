"""The "repeated passages" language of the learnability tests, and the AE and CALM trained on it.

The corpus is a random concatenation of a few fixed passages: inside a passage the next chunk is fully
determined by the context; only at passage boundaries (one chunk in 32) is it random, so a perfect
model scores about 97.6% next-chunk exact match. Held-out text is a fresh concatenation.
"""

from __future__ import annotations

from typing import Any

import torch

from calm.models.autoencoder import Autoencoder

from .models import tiny_autoencoder, tiny_calm

VOCAB, K, PASSAGES, PASSAGE_LEN, BLOCK = 32, 4, 4, 128, 64
"""32 ids, chunks of K = 4, 4 passages of 128 tokens, training blocks of 64 tokens (16 chunks)."""

LEARNABLE_AE: dict[str, Any] = dict(hidden_size=64, intermediate_size=128, latent_size=16)
"""The autoencoder of these tests: wider than the tiny one, so 300 steps reconstruct > 99% of tokens."""


def make_stream(passages: torch.Tensor, num: int, gen: torch.Generator) -> torch.Tensor:
    """``num`` passages drawn with replacement and concatenated into one token stream."""
    order = torch.randint(0, len(passages), (num,), generator=gen)
    return passages[order].reshape(-1)


def repeated_passages(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Generator]:
    """(train stream of 400 passages, held-out stream of 40, the generator to go on with), all seeded:
    ``torch.manual_seed(seed)`` for the models that follow, and a generator of ``seed`` for the data."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    passages = torch.randint(0, VOCAB, (PASSAGES, PASSAGE_LEN), generator=gen)
    return make_stream(passages, 400, gen), make_stream(passages, 40, gen), gen


def random_blocks(stream: torch.Tensor, batch: int, gen: torch.Generator) -> torch.Tensor:
    """Blocks start on chunk boundaries of the passages (multiples of K), so chunks align with them."""
    starts = K * torch.randint(0, (len(stream) - BLOCK) // K, (batch,), generator=gen)
    return torch.stack([stream[s : s + BLOCK] for s in starts.tolist()])


def train_autoencoder(train: torch.Tensor, gen: torch.Generator) -> Autoencoder:
    """The tests' autoencoder: 300 AdamW steps on 32-block batches of ``train``; returned in eval mode.

    Built from the global generator as the caller left it (``repeated_passages`` seeds it)."""
    ae = tiny_autoencoder(vocab=VOCAB, seed=None, chunk_size=K, **LEARNABLE_AE)
    opt = torch.optim.AdamW(ae.parameters(), lr=3e-3)
    ae.train()
    for _ in range(300):
        loss = ae(random_blocks(train, 32, gen).view(-1, K)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return ae.eval()


def train_calm_and_score(
    ae: Autoencoder,
    train: torch.Tensor,
    held_out: torch.Tensor,
    gen: torch.Generator,
    sample_generator: torch.Generator | None = None,
    **config: Any,
) -> float:
    """Train the tests' CALM (``config`` adds CALMConfig fields) for 400 steps on ``train``; return its
    next-chunk exact match on held-out blocks with one head sample per position (T = 1)."""
    # init_std scaled to the width (0.02 * sqrt(1024 / d)): with the paper's 0.02 at d = 64 every
    # Linear of the energy head shrinks its input ~6x and the head barely learns in this budget
    # (measured: energy loss stuck near 6.4 after 300 steps, against 0.74 with 0.08)
    sizes = dict(hidden_size=64, intermediate_size=128, max_seq_len=BLOCK // K, num_head_blocks=2, init_std=0.08)
    model = tiny_calm(
        vocab=VOCAB, K=K, latent=16, seed=None, autoencoder=ae, num_samples=8, num_target_samples=100, **sizes, **config
    )
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=3e-3)
    model.train()
    for _ in range(400):
        loss, _ = model(random_blocks(train, 16, gen))
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()

    blocks = random_blocks(held_out, 64, gen)
    chunks = blocks.view(len(blocks), -1, K)
    with torch.no_grad():
        h = model.hidden_states(chunks[:, :-1])
        pred = ae.decode_ids(model.head.sample(h, 1, sample_generator)[0])
    exact = (pred == chunks[:, 1:]).all(-1)
    # a context-dependent prediction: skip the first steps, where the passage is not yet identified
    return exact[:, 3:].float().mean().item()
