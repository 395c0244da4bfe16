"""An autoencoder whose latent geometry reflects context (a probe, not part of the library).

The tiny autoencoder places two chunks of one document as far apart as two chunks of different
documents (``benchmarks/prompt_diagnostics.py``), so the energy score hardly rewards a head for the
topic of its context. This trains the demo's autoencoder (preset ``tiny``, the demo's data) with one
extra term: an InfoNCE loss that makes each chunk's posterior mean nearer (in Euclidean distance, the
energy score's) to the next chunk of its document than to the other chunks of the batch,

    loss = CE·K + β·KL  +  WEIGHT · CE_rows(−‖μ_i − μ'_j‖ / TAU, j = i),

with half of each batch the chunks drawn as usual and the other half the chunks that follow them.
``train.batch_tokens`` is halved, so the autoencoder sees as many chunks per step as the demo's.
The result is an ordinary autoencoder run directory for ``calm train-calm --autoencoder``.

    PYTHONPATH=. python docs/research/scripts/context_autoencoder.py DATA OUT WEIGHT [TAU]

Kept to reproduce the context-shaped autoencoders of docs/research/small-calm.md ("Do the continuations
follow their prompts?"). The library has the same term as an option of ours (``autoencoder: model.context_weight``,
``context_tau``; ``calm train-ae --set model.context_weight=2``). The library's term reads μ from the forward
pass, whose input has DropToken applied, where this script encodes the chunks a second time without it; at
weight 2, τ 4 on the demo's data the two ended alike (InfoNCE 5.10 against 5.08, validation token accuracy
99.77% against 99.78%).
"""

from __future__ import annotations

import sys

import numpy as np
import torch
import torch.nn.functional as F

from calm.config import load_preset
from calm.train.stages import AutoencoderStage
from calm.train.loop import run_training


class ContextAutoencoderStage(AutoencoderStage):
    """The autoencoder stage with the InfoNCE term on (chunk, next chunk) pairs."""

    def __init__(self, *args, weight: float, tau: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.weight, self.tau = weight, tau

    def make_batch(self, indices: np.ndarray, device: torch.device) -> torch.Tensor:
        first = np.sort(indices)
        pair = np.concatenate([first, np.minimum(first + 1, len(self.chunks) - 1)])
        return torch.from_numpy(np.asarray(self.chunks[pair], dtype=np.int64)).to(device)

    def loss(self, model, batch):
        loss, metrics = super().loss(model, batch)
        if not model.training:
            return loss, metrics
        mu = model.encode(batch)[0].float()
        half = mu.shape[0] // 2
        logits = -torch.cdist(mu[:half], mu[half:]) / self.tau
        nce = F.cross_entropy(logits, torch.arange(half, device=mu.device))
        return loss + self.weight * nce, {**metrics, "nce": nce.detach()}


def main() -> None:
    data, out, weight = sys.argv[1], sys.argv[2], float(sys.argv[3])
    tau = float(sys.argv[4]) if len(sys.argv) > 4 else 1.0
    preset = load_preset("autoencoder", "tiny", {})
    preset.train.batch_tokens //= 2
    stage = ContextAutoencoderStage(data, preset.model, preset.train, weight=weight, tau=tau)
    run_training(stage, preset.train, out, resume=True, progress=False)


if __name__ == "__main__":
    main()
