"""Learnability, independent of scale: AE + CALM learn a structured synthetic language quickly.

The corpus is a random concatenation of a few fixed passages (the "repeated passages" language of
``factories.passages``): inside a passage the next chunk is fully determined by the context; only at
passage boundaries (one chunk in 32) is it random, so a perfect model scores about 97.6%. Held-out
text is a fresh concatenation. A wiring bug anywhere between the autoencoder's posterior, the input
compression, the backbone, the energy head, the energy loss or the decoder shows up as accuracy near
chance instead of the >= 90% this test demands.
"""

import time

import torch
from factories.passages import K, repeated_passages, train_autoencoder, train_calm_and_score


def test_autoencoder_and_calm_learn_next_chunk_exactly():
    train, held_out, gen = repeated_passages(seed=0)
    start = time.process_time()  # CPU time: the budget is two CPU minutes

    ae = train_autoencoder(train, gen)
    test_chunks = held_out[: len(held_out) // K * K].view(-1, K)
    with torch.no_grad():
        recon = (ae.decode_ids(ae.encode(test_chunks)[0]) == test_chunks).float().mean().item()
    assert recon > 0.99, f"autoencoder reconstruction {recon:.3f}"

    accuracy = train_calm_and_score(ae, train, held_out, gen)
    elapsed = time.process_time() - start
    assert accuracy >= 0.90, f"next-chunk exact match {accuracy:.3f} on held-out positions ({elapsed:.0f} CPU s)"
    assert elapsed < 120, f"took {elapsed:.0f} CPU seconds, the test's budget is two CPU minutes"
