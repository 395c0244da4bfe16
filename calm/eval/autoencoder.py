"""Evaluation drivers: run models over a data set and aggregate metrics.

- ``evaluate_autoencoder``: token reconstruction accuracy decoding μ and decoding z ~ q(z|x) (the
  noise the language model sees, paper §3), chunk exact match and cross-entropy (paper §3).
Evaluation text comes from ``calm.data.evalsets``; the BrierLM drivers live in ``calm.eval.brier``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from calm.models.autoencoder import Autoencoder


@torch.no_grad()
def evaluate_autoencoder(
    model: Autoencoder,
    chunks: np.ndarray | torch.Tensor,
    *,
    special_ids: tuple[int, ...] = (),
    batch_chunks: int = 2048,
    device: torch.device | str = "cpu",
    seed: int = 0,
    progress: bool = False,
) -> dict[str, float]:
    """Reconstruction metrics over ``chunks`` (n, K).

    Token accuracies count text tokens only: positions whose target is in ``special_ids`` (BOS,
    EOS, PAD) are excluded, since reconstructing padding is trivial and would inflate the figure.
    ``chunk_exact_match`` requires every position of the chunk, specials included, to match.
    """
    was_training = model.training
    model.eval()
    chunks = torch.as_tensor(np.asarray(chunks), dtype=torch.long)
    gen = torch.Generator(device="cpu").manual_seed(seed)
    special = torch.tensor(sorted(set(special_ids)), dtype=torch.long)
    correct_mu = correct_z = counted = exact_chunks = 0
    ce_sum, ce_count = 0.0, 0
    for start in tqdm(range(0, len(chunks), batch_chunks), desc="eval autoencoder", disable=not progress):
        batch = chunks[start : start + batch_chunks]
        ids = batch.to(device)
        mu, log_std = model.encode(ids)
        logits = model.decode(mu)
        z = mu + log_std.exp() * torch.randn(mu.shape, generator=gen).to(device)
        pred_mu, pred_z = logits.argmax(-1).cpu(), model.decode(z).argmax(-1).cpu()
        mask = ~torch.isin(batch, special) if len(special) else torch.ones_like(batch, dtype=torch.bool)
        correct_mu += int(((pred_mu == batch) & mask).sum())
        correct_z += int(((pred_z == batch) & mask).sum())
        counted += int(mask.sum())
        exact_chunks += int((pred_mu == batch).all(-1).sum())
        ce_sum += float(F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), ids.reshape(-1), reduction="sum"))
        ce_count += ids.numel()
    model.train(was_training)
    return {
        "token_accuracy": correct_mu / max(counted, 1),
        "token_accuracy_sampled": correct_z / max(counted, 1),
        "chunk_exact_match": exact_chunks / max(len(chunks), 1),
        "ce": ce_sum / max(ce_count, 1),
        "tokens": counted,
        "chunks": len(chunks),
    }
