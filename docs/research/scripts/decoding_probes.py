"""Attempts to make a trained CALM follow its prompts without retraining (none helped).

Not part of the library: a record of what was tried (docs/research/small-calm.md, "Do the continuations
follow their prompts?"), runnable on any CALM checkpoint trained with the auxiliary readout
(``model.token_aux_weight`` > 0, ours). Each scores generations with ``calm.eval.prompt_following``
(128 validation prompts, 64 + 32 tokens, seed 0).

- ``guidance W[,W...]``: extrapolate each head sample away from a context-free one with the same noise,
  x = f(ε, h̄) + W·(f(ε, h) − f(ε, h̄)), h̄ = the mean hidden state over 32 training blocks (the idea of
  classifier-free guidance, for a one-step head). Also reports Brier-1..4 on the first 32,768
  validation tokens, where the guided head is used for BrierLM's samples too.
- ``reweight``: re-weight the N = 200 candidates of each step by the auxiliary readout's probability of
  their first token, p_aux^(γ/T), on top of the batch approximation's weights (a hybrid decoder).
- ``finetune WEIGHT STEPS``: fit a linear latent → first-token probe on 60,000 training chunks (600 Adam
  steps), then train only the head for STEPS steps (4 blocks of 1,024 tokens each, lr 3e-4) on the
  energy loss + WEIGHT × the token score of ``model.token_score_weight`` over its 8 samples, and print
  ``benchmarks/prompt_diagnostics.py``'s bag AUCs.

    PYTHONPATH=. python docs/research/scripts/decoding_probes.py guidance 1,1.5,2,3 RUN DATA
    PYTHONPATH=. python docs/research/scripts/decoding_probes.py reweight RUN DATA
    PYTHONPATH=. python docs/research/scripts/decoding_probes.py finetune 1.0 200 RUN DATA
"""

from __future__ import annotations

import math
import sys

import numpy as np
import torch
import torch.nn.functional as F

from calm.eval.brier import evaluate_checkpoint
from calm.checkpoint import load_model, resolve_checkpoint
from calm.data.shards import TokenShard, lm_blocks
from calm.generate.engine import left_pad_to_chunks
from calm.models.heads import EnergyHead
from calm.eval.prompt_following import prompt_following, prompt_set, retrieval_auc, retrieval_scores, unigram
from calm.generate.sampling import batch_temperature_probs


def guidance(weights: list[float], run: str, data: str) -> None:
    model, tok, _ = load_model(resolve_checkpoint(run), kind="calm")
    blocks = lm_blocks(TokenShard(data, "train"), 1024)
    pick = np.random.default_rng(0).choice(len(blocks), 32, replace=False)
    with torch.no_grad():
        x = torch.tensor(np.asarray(blocks[pick], dtype=np.int64)).view(32, -1, model.chunk_size)
        h_mean = model.hidden_states(x).reshape(-1, model.config.hidden_size).float().mean(0)
    weight = [1.0]

    def guided(self, h, num_samples, generator=None):  # replaces EnergyHead.sample, also inside calm eval
        hs = h.unsqueeze(0).expand(num_samples, *h.shape)
        noise = torch.rand((num_samples, *h.shape[:-1], self.noise_size), generator=generator).sub_(0.5).to(h.dtype)
        conditional = self(hs, noise)
        if weight[0] == 1.0:
            return conditional
        free = self(h_mean.to(h.dtype).expand_as(hs), noise)
        return free + weight[0] * (conditional - free)

    EnergyHead.sample = guided
    for w in weights:
        weight[0] = w
        auc = prompt_following({"calm": model}, tok, data)["results"]["calm"]
        ev = evaluate_checkpoint(run, data, max_tokens=32768, progress=False)
        briers = " / ".join(f"{ev[f'brier{n}']:.2f}" for n in range(1, 5))
        print(f"W = {w:g}: AUC {auc['auc']:.3f} ± {auc['auc_se']:.3f}, Brier-1..4 {briers}", flush=True)


@torch.no_grad()
def reweight(run: str, data: str, num_samples: int = 200) -> None:
    model, tok, _ = load_model(resolve_checkpoint(run), kind="calm")
    val, train = TokenShard(data, "val"), TokenShard(data, "train")
    background = unigram(np.asarray(train.tokens), val.vocab_size)
    ps = prompt_set(val, 128, 64, 32, tok.bos_id)
    B, K = len(ps.prompts), model.chunk_size
    for temperature, gamma in ((0.5, 0.0), (1.0, 1.0), (1.0, 2.0), (0.5, 1.0)):
        generator = torch.Generator().manual_seed(0)
        prompt = left_pad_to_chunks([[tok.bos_id] + p for p in ps.prompts], K, tok.bos_id)
        cache = model.new_cache(B, max_len=prompt.shape[1] // K + 8)
        h = model.hidden_states(prompt.view(B, -1, K), cache)[:, -1]
        out: list[list[int]] = [[] for _ in range(B)]
        for _ in range(32 // K):
            z = model.head.sample(h, num_samples, generator)
            cands = model.autoencoder.decode_ids(z.reshape(-1, z.shape[-1])).view(num_samples, B, K).transpose(0, 1)
            probs = batch_temperature_probs(cands, temperature)
            if gamma:
                log_p = model.token_aux_head(h).float()[:, : val.vocab_size].log_softmax(-1).gather(1, cands[:, :, 0])
                probs = probs * (gamma / temperature * (log_p - log_p.max(1, keepdim=True).values)).exp().double()
            chosen = cands[torch.arange(B), torch.multinomial(probs, 1, generator=generator).squeeze(1)]
            for b in range(B):
                out[b] += chosen[b].tolist()
            h = model.hidden_states(chosen[:, None], cache)[:, -1]
        auc, se, _ = retrieval_auc(retrieval_scores(ps.prompts, out, background))
        print(f"T = {temperature:g}, γ = {gamma:g}: AUC {auc:.3f} ± {se:.3f}", flush=True)


def finetune(weight: float, steps: int, run: str, data: str) -> None:
    sys.path.insert(0, "benchmarks")
    from prompt_diagnostics import bag_aucs

    torch.manual_seed(0)
    model, tok, _ = load_model(resolve_checkpoint(run), kind="calm")
    train = TokenShard(data, "train")
    chunks = torch.tensor(np.asarray(train.tokens[: 4 * 60000], dtype=np.int64).reshape(-1, 4))
    with torch.no_grad():
        mu, log_std = model.autoencoder.encode(chunks)
    mu, std = mu.float(), log_std.float().exp()
    probe = torch.nn.Linear(mu.shape[-1], model.config.vocab_size)
    optimizer = torch.optim.Adam(probe.parameters(), lr=3e-3)
    for _ in range(600):
        i = torch.randint(0, len(chunks), (4096,))
        loss = F.cross_entropy(probe(mu[i] + std[i] * torch.randn_like(mu[i])), chunks[i, 0])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"probe: training cross-entropy {loss.item():.2f}", flush=True)
    probe.requires_grad_(False)
    blocks = lm_blocks(train, 1024)
    optimizer = torch.optim.AdamW(model.head.parameters(), lr=3e-4)
    for step in range(steps):
        x = torch.tensor(np.asarray(blocks[np.random.default_rng(step).choice(len(blocks), 4)], dtype=np.int64))
        x = x.view(4, -1, model.chunk_size)
        with torch.no_grad():
            h = model.hidden_states(x[:, :-1]).reshape(-1, model.config.hidden_size)
            target_mu, target_log_std = model.target_posterior(x[:, 1:])
        energy, metrics = model.head.loss(h, target_mu.flatten(0, 1), target_log_std.exp().flatten(0, 1))
        log_probs = F.linear(model.head.sample(h, 8).float(), probe.weight, probe.bias).log_softmax(-1)
        score = F.nll_loss(torch.logsumexp(log_probs, 0) - math.log(8), x[:, 1:, 0].reshape(-1))
        optimizer.zero_grad()
        (energy + weight * score).backward()
        optimizer.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step}: energy {metrics['energy_loss']:.3f}, token score {score.item():.3f}", flush=True)
    model.eval()
    for name, (auc, se) in bag_aucs(model, tok, data).items():
        print(f"  {name:<34} {auc:.3f} ± {se:.3f}")


if __name__ == "__main__":
    if sys.argv[1] == "guidance":
        guidance([float(w) for w in sys.argv[2].split(",")], sys.argv[3], sys.argv[4])
    elif sys.argv[1] == "reweight":
        reweight(sys.argv[2], sys.argv[3])
    else:
        finetune(float(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5])
