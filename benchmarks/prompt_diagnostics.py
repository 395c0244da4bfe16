"""Why a small CALM's continuations ignore their prompts: two measurements (docs/research/small-calm.md).

1. **Latent geometry.** For chunks of the validation documents (8 per document), the mean latent
   distance between two chunks of one document and between chunks of different documents, and the
   energy score (α = 1, lower is better) of two empirical predictors of a chunk: all other chunks (the
   marginal) and the other chunks of its own document (a predictor that knows the document). If
   knowing the document barely lowers the score, the energy loss barely rewards a head for following
   the topic or register of its context.
2. **Where the prompt is lost.** For the validation prompts of ``calm follow``, the prompt retrieval
   AUC (``calm.eval.prompt_following``) of bags of next-chunk tokens: 200 head samples (first tokens and
   whole chunks), 200 draws from the auxiliary next-token readout of h (if the model has one), and the
   real next token / chunk. A high readout AUC with a head AUC near 0.5 says that h knows the prompt
   and the head does not use it.

    PYTHONPATH=. python benchmarks/prompt_diagnostics.py --checkpoint runs/demo/calm --data runs/demo/data
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from calm.checkpoint import load_model, resolve_checkpoint
from calm.data.shards import TokenShard
from calm.data.tokenizer import Tokenizer
from calm.eval.prompt_following import prompt_set, retrieval_auc, retrieval_scores, unigram
from calm.generate.engine import left_pad_to_chunks
from calm.models.autoencoder import Autoencoder
from calm.models.calm import CALM


@torch.no_grad()
def latent_geometry(autoencoder: Autoencoder, shard: TokenShard, per_doc: int = 8, seed: int = 0) -> dict[str, float]:
    """Same- vs cross-document latent distances (posterior means) and the two energy scores."""
    rng = np.random.default_rng(seed)
    K = autoencoder.chunk_size
    mus, docs = [], []
    for i in range(len(shard)):
        text = np.asarray(shard.document(i))[1:]
        n = len(text) // K
        if n < per_doc:
            continue
        pick = rng.choice(n, per_doc, replace=False)
        chunks = torch.tensor(np.stack([text[K * j : K * j + K] for j in pick]).astype(np.int64))
        mus.append(autoencoder.encode(chunks)[0].float())
        docs += [i] * per_doc
    mu, doc = torch.cat(mus), torch.tensor(docs)
    dist = torch.cdist(mu, mu)
    same = (doc[:, None] == doc[None]) & ~torch.eye(len(doc), dtype=torch.bool)
    other = ~torch.eye(len(doc), dtype=torch.bool)

    def score(mask: torch.Tensor) -> float:  # E|X - y| - E|X - X'| / 2 over the predictor's chunks X
        values = []
        for a in range(len(doc)):
            m = mask[a]
            spread = dist[m][:, m].sum() / (m.sum() * (m.sum() - 1))
            values.append(float(dist[a][m].mean() - 0.5 * spread))
        return float(np.mean(values))

    return {
        "chunks": len(doc),
        "same_document_distance": float(dist[same].mean()),
        "cross_document_distance": float(dist[doc[:, None] != doc[None]].mean()),
        "energy_score_marginal": score(other),
        "energy_score_knowing_the_document": score(same),
    }


@torch.no_grad()
def bag_aucs(
    model: CALM, tokenizer: Tokenizer, data: str, num_prompts: int = 128, draws: int = 200, seed: int = 0
) -> dict[str, float]:
    """Prompt retrieval AUC of bags of next-chunk tokens: head samples, the aux readout, the real text."""
    val, train = TokenShard(data, "val"), TokenShard(data, "train")
    background = unigram(np.asarray(train.tokens), val.vocab_size)
    ps = prompt_set(val, num_prompts, 64, 32, tokenizer.bos_id)
    B, K = len(ps.prompts), model.chunk_size
    generator = torch.Generator().manual_seed(seed)
    prompt = left_pad_to_chunks([[tokenizer.bos_id] + p for p in ps.prompts], K, tokenizer.bos_id)
    h = model.hidden_states(prompt.view(B, -1, K))[:, -1]
    ids = model.draw_chunks(h, draws, generator)  # (draws, B, K); an anchored chunk starts with its drawn token
    bags = {
        f"head samples x{draws}, first tokens": ids[:, :, 0].T.tolist(),
        f"head samples x{draws}, whole chunks": ids.permute(1, 0, 2).reshape(B, -1).tolist(),
    }
    readout = getattr(model, "token_aux_head", None) or getattr(model.head, "token_readout", None)
    if readout is not None:  # the training-only aux readout, or the anchored head's own (token_anchor)
        probs = readout(h).float()[:, : val.vocab_size].softmax(-1)
        bags[f"aux readout x{draws} draws"] = torch.multinomial(probs, draws, True, generator=generator).tolist()
    bags["real next token"] = [r[:1] for r in ps.references]
    bags["real next chunk"] = [r[:K] for r in ps.references]
    return {name: retrieval_auc(retrieval_scores(ps.prompts, bag, background))[:2] for name, bag in bags.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", required=True, help="a CALM checkpoint or run directory")
    parser.add_argument("--data", required=True, help="its prepared data directory")
    args = parser.parse_args()
    model, tokenizer, _ = load_model(resolve_checkpoint(args.checkpoint), kind="calm")
    geometry = latent_geometry(model.autoencoder, TokenShard(args.data, "val"))
    print(f"latent geometry over {geometry['chunks']} validation chunks (posterior means):")
    print(f"  distance within a document {geometry['same_document_distance']:.2f}, "
          f"across documents {geometry['cross_document_distance']:.2f}")  # fmt: skip
    print(f"  energy score of the marginal {geometry['energy_score_marginal']:.3f}, "
          f"knowing the document {geometry['energy_score_knowing_the_document']:.3f} (lower is better)")  # fmt: skip
    print("prompt retrieval AUC of next-chunk token bags (chance 0.5):")
    for name, (auc, se) in bag_aucs(model, tokenizer, args.data).items():
        print(f"  {name:<34} {auc:.3f} ± {se:.3f}")


if __name__ == "__main__":
    main()
