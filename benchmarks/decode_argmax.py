"""The autoencoder decoder's vocabulary argmax: the cost that dominates CALM decoding (paper Table 1's inference FLOPs).

Each CALM step decodes S head samples into K tokens with ``argmax(h @ E^T)`` over the tied
embedding E (V × d; 128,257 × 512 for the ``paper`` AE). At S = 1 (greedy, T = 1) that is 4 rows
against a 263 MB fp32 table: memory-bound. At S = 200 (the T = 1/2 batch sampler, paper Alg. 2) it is
800 rows, 105 GFLOP per step: compute-bound. This script times exact alternatives to the
library's ``Autoencoder.decode_ids`` and checks that they return the same ids:

- ``reference``: ``(h @ E.t()).argmax(-1)``, what ``decode_ids`` does.
- ``weight_left``: ``(E @ h.t()).argmax(0)``. The same product with the big matrix on the left,
  which the CPU BLAS runs at memory bandwidth for a few rows (``h @ E.t()`` does not).
- ``bf16``: logits in bf16. Not exact: an argmax can flip where two logits are within bf16
  rounding; shown for its speed and its disagreement rate.
- ``bf16_screened``: exact. bf16 logits, then the bf16 top-64 ids of each row are re-scored in
  fp32. With unit round-off u = 2^-8, rounding h and E to bf16 (2u), fp32 accumulation and the
  bf16 output (u) keep |bf16 − exact| below bound = 2^-6·‖h‖·max_v‖E_v‖, so the exact argmax
  has a bf16 logit within 2·bound of the row's bf16 maximum; where the 64th bf16 logit is
  already lower, the fp32 argmax over the top 64 is the exact argmax (other rows are redone in
  fp32).
- ``auto``: ``calm.models.autoencoder.vocab_argmax``: ``bf16_screened`` from 2^24 logits on where
  ``calm.hardware`` finds bf16 fast, else ``weight_left`` below 64 rows and ``reference`` from 64.
- ``int8_screen``: exact, needs no bf16. ``calm.models.vocab_search.Int8Screen``: int8 logits
  (``torch._int_mm``) with a certified error bound, and an fp32 re-score of the ids within the
  bound of each row's best (what ``Autoencoder.decode_ids`` uses at large vocabularies). The int8
  table is built once per model, outside the timing.

The lazy Alg. 2 path (``calm.generate.lazy_decode``) decodes 200 rows per step with random weights (the
first token of each candidate), then the K - 1 = 3 remaining tokens of the chosen one.

Usage: ``PYTHONPATH=. python benchmarks/decode_argmax.py [--threads 1] [--ae paper] [--json]``
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from calm.config import load_preset
from calm.hardware import bf16_is_fast, int8_matmul_available
from calm.io import to_json
from calm.models.autoencoder import Autoencoder
from calm.models.vocab_search import Int8Screen, vocab_argmax

SCREEN_MIN_LOGITS = 2**24
"""From this many logits on, the bf16 screen beats the fp32 product (on CPUs with bf16 matmuls);
e.g. 800 rows against 128k ids, not 800 rows against the tiny 4k vocabulary."""


def weight_left_argmax(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """argmax_v h·E_v for h (M, d): the product as (V, d) @ (d, M), reduced over V."""
    return (weight @ h.t()).argmax(0)


def bf16_argmax(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Approximate: the argmax of bf16 logits (``max`` is much faster than ``argmax`` on bf16)."""
    return F.linear(h.to(torch.bfloat16), weight.to(torch.bfloat16)).max(-1).indices


def screened_argmax(h: torch.Tensor, weight: torch.Tensor, top: int = 64) -> torch.Tensor:
    """Exact argmax_v h·E_v for h (M, d): bf16 logits, then an fp32 re-score of the bf16 top ids.

    The true argmax has a bf16 logit within ``2·bound`` of the row's bf16 maximum (module
    docstring). If the ``top``-th best bf16 logit is already below that, every id outside the top
    cannot win, and the fp32 argmax over the top ids is exact; other rows (rare: a flat top) fall
    back to the fp32 product.
    """
    approx = F.linear(h.to(torch.bfloat16), weight.to(torch.bfloat16))  # (M, V)
    values, ids = approx.topk(min(top, weight.shape[0]), dim=-1)  # (M, top), best first
    values = values.float()
    bound = 2**-6 * h.norm(dim=-1) * weight.norm(dim=-1).max()  # (M,)
    exact = torch.einsum("md,mtd->mt", h, weight[ids])  # (M, top) fp32 logits of the top ids
    best = exact.max(-1, keepdim=True).values
    lowest = torch.where(exact == best, ids, weight.shape[0]).min(-1).values  # lowest id on a tie
    flat = values[:, -1] >= values[:, 0] - 2 * bound  # an id outside the top could still win
    if bool(flat.any()):
        lowest[flat] = (h[flat] @ weight.t()).argmax(-1)
    return lowest


VARIANTS: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "reference": lambda h, w: (h @ w.t()).argmax(-1),
    "weight_left": weight_left_argmax,
    "bf16": bf16_argmax,
    "bf16_screened": screened_argmax,
    # the library's choice: the bf16 screen only where calm.hardware finds bf16 fast
    "auto": lambda h, w: vocab_argmax(h, w, bf16_screen=bf16_is_fast(h.device)),
}


def _time(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def near_tie_rows(weight: torch.Tensor, rows: int, gap: float, seed: int = 0) -> torch.Tensor:
    """Hidden states whose two best logits (ids a, b) differ by ``gap`` times their size.

    h starts along E_a + E_b, which makes a and b the two best ids by far, and is then moved
    along u = E_a − E_b until h·E_a − h·E_b = gap·h·E_a: the screen's hard case.
    """
    gen = torch.Generator().manual_seed(seed)
    a, b = torch.randint(0, weight.shape[0], (2, rows), generator=gen)
    h = 20 * (weight[a] + weight[b]).double()
    u = (weight[a] - weight[b]).double()
    target = gap * (h * weight[a].double()).sum(-1)
    h = h + ((target - (h * u).sum(-1)) / (u * u).sum(-1))[:, None] * u
    return h.float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ae", default="paper", help="autoencoder preset (paper: V=128,257, d=512)")
    parser.add_argument("--vocab-size", type=int, default=128_257)
    parser.add_argument("--rows", type=int, nargs="+", default=[3, 4, 200, 800], help="K·S rows to decode")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    ae = Autoencoder(load_preset("autoencoder", args.ae, {"model.vocab_size": args.vocab_size}).model).eval()
    weight = ae.embed_tokens.weight.detach()
    variants = dict(VARIANTS)
    if int8_matmul_available(weight.device):
        screen = Int8Screen(weight)
        variants["int8_screen"] = lambda h, w: screen.argmax(h)
    report: dict[str, object] = {"threads": torch.get_num_threads(), "vocab": weight.shape[0], "rows": {}}
    with torch.no_grad():
        for rows in args.rows:
            z = torch.randn(-(-rows // ae.chunk_size), ae.config.latent_size)
            h = ae.decode_hidden(z).reshape(-1, weight.shape[1])[:rows]  # the decoder's real final hidden states
            reference = variants["reference"](h, weight)
            entry: dict[str, object] = {}
            for name, fn in variants.items():
                reps = args.repeats if rows < 100 else max(2, args.repeats // 2)
                ms = 1e3 * _time(lambda fn=fn, h=h: fn(h, weight), reps)
                agree = float((fn(h, weight) == reference).float().mean())
                entry[name] = {"ms": round(ms, 2), "agreement": agree}
                if not args.json:
                    print(f"rows={rows:<4} {name:<14} {ms:9.1f} ms   agreement with reference {agree:.4f}")
            report["rows"][rows] = entry  # type: ignore[index]
        # near ties: the screen must still match an fp64 argmax wherever fp32 itself is unambiguous
        for gap in (1e-2, 1e-4):
            h = near_tie_rows(weight, 256, gap)
            exact = (h.double() @ weight.double().t()).argmax(-1)
            result = {name: float((fn(h, weight) == exact).float().mean()) for name, fn in variants.items()}
            report[f"near_tie_agreement_with_fp64_gap_{gap:g}"] = result
            if not args.json:
                print(f"near ties (gap {gap:g}), agreement with an fp64 argmax: {result}")
    if args.json:
        print(to_json(report, indent=2))


if __name__ == "__main__":
    main()
