"""Exact vocabulary argmax through a certified int8 screen (the cost of CALM decoding; paper Table 1).

Decoding a latent ends in ``argmax_v h·E_v`` over the tied embedding E (V × d; 128,257 × 512 for
the ``paper`` autoencoder). :class:`Int8Screen` keeps an int8 copy of E and answers that argmax
exactly while computing most logits only in int8 (4× the fp32 matmul rate on a CPU with VNNI, and
a quarter of the bytes, so also faster for the few rows of greedy decoding). It needs no bf16.

**The bound.** E = s·Q + R with one scale s = max|E| / 127, Q int8 and |R| <= s/2 entrywise; each
row h = t·q + r with t = max|h| / 127, q int8. The screen logit is t·s·(q·Q_v), an exact int32
product; the true logit differs from it by h·R_v + s·r·Q_v, so by at most

    eps = ||h||·max_v ||R_v|| + s·||r||·max_v ||Q_v||        (Cauchy-Schwarz, L2 norms).

The reference logit (what a plain fp32 or bf16 matmul returns) differs from the true one by at
most ``rho``: fp32 accumulation, d·2^-24·||h||·max_v||E_v||, plus for bf16 outputs a rounding of
2^-8 of the |logit| (bounded through the row's best screen score). So the reference argmax has a
screen logit within 2·(eps + rho) of the row's largest screen logit; every id in that window is
re-scored with the reference arithmetic (a plain ``F.linear`` of the row against those rows of
E), and the lowest id among the best is returned, as ``argmax`` does. Ids outside the window are never computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

BLOCK = 8192
"""Vocabulary ids per int8 block: the (rows, BLOCK) int32 block stays in cache while it is screened."""
GROUP = 16
"""Ids per group whose int32 maximum is compared first: only groups that reach the window are opened."""
MAX_WINDOW_IDS = 4096
"""A row with more ids than this in its window (a flat top) is re-scored over the whole vocabulary."""


@dataclass(frozen=True)
class ArgmaxScreens:
    """Which exact screens a device may use for the vocabulary argmax; the caller (``calm.checkpoint``, from
    ``calm.hardware``) decides, the models never probe the hardware. Both screens return the reference
    argmax exactly: they change the speed only."""

    bf16: bool = False
    """Screen many fp32 logits in bf16 (:func:`vocab_argmax`): where bf16 matmuls are fast on a CPU."""
    int8: bool = False
    """Screen large vocabularies in int8 (:class:`Int8Screen`): where ``torch._int_mm`` runs."""


SCREEN_MIN_LOGITS = 2**24
"""``vocab_argmax`` screens in bf16 from this many logits on: e.g. the 200 candidates × 4 tokens
of temperature sampling against the 128k vocabulary, not the tiny 4k one (where it does not pay)."""


def vocab_argmax(hidden: torch.Tensor, weight: torch.Tensor, top: int = 64, bf16_screen: bool = False) -> torch.Tensor:
    """argmax_v hidden·weight_v for hidden (M, d), weight (V, d) -> (M,) ids; exact, lowest id on a tie.

    This product dominates a CALM decoding step (paper Table 1's inference FLOPs; ``benchmarks/decode_argmax.py``).
    Few rows (greedy decoding decodes K = 4): the product runs as weight @ hidden^T, with the
    (V, d) table on the left, which a CPU BLAS streams at memory bandwidth, about 2x faster
    than hidden @ weight^T. Many fp32 logits on a CPU with ``bf16_screen`` (the caller's word that bf16
    matmuls are fast here, from ``calm.hardware``): the logits are computed
    in bf16 and the ``top`` best ids of each row are re-scored in fp32. With unit round-off
    u = 2^-8, bf16 inputs (2u), fp32 accumulation and a bf16 output (u) keep each bf16 logit
    within bound = 2^-6·‖hidden‖·max_v‖weight_v‖ of the exact one, so the exact argmax has a bf16
    logit within 2·bound of the row's bf16 maximum. Where the ``top``-th bf16 logit is lower than
    that, the fp32 argmax over the top ids is exact; the other rows (a flat top) are redone in fp32.
    """
    rows, vocab = hidden.shape[0], weight.shape[0]
    screen = (
        rows * vocab >= SCREEN_MIN_LOGITS
        and hidden.dtype == weight.dtype == torch.float32
        and hidden.device.type == "cpu"
        and bf16_screen
    )
    if not screen:
        return (weight @ hidden.t()).argmax(0) if rows < 64 else (hidden @ weight.t()).argmax(-1)
    return bf16_screened_argmax(hidden, weight, top)


def bf16_screened_argmax(hidden: torch.Tensor, weight: torch.Tensor, top: int = 64) -> torch.Tensor:
    """The bf16 screen of :func:`vocab_argmax` (its docstring gives the bound): hidden (M, d), weight (V, d)
    fp32 -> (M,) ids, exact. Correct on any device; fast only where bf16 matmuls are."""
    vocab = weight.shape[0]
    approx = F.linear(hidden.to(torch.bfloat16), weight.to(torch.bfloat16))  # (M, V)
    values, ids = approx.topk(min(top, vocab), dim=-1)  # (M, top), best first
    values = values.float()
    bound = 2**-6 * hidden.norm(dim=-1) * weight.norm(dim=-1).max()  # (M,)
    exact = torch.einsum("md,mtd->mt", hidden, weight[ids])  # (M, top) fp32 logits of the top ids
    best = exact.max(-1, keepdim=True).values
    out = torch.where(exact == best, ids, vocab).min(-1).values
    flat = values[:, -1] >= values[:, 0] - 2 * bound  # an id outside the top could still win
    if bool(flat.any()):
        out[flat] = (hidden[flat] @ weight.t()).argmax(-1)
    return out


def _quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, d) float -> (q int8 (M, d), scale t (M,), residual norm ||x - t·q|| (M,)), one scale per row."""
    scale = x.abs().amax(1).clamp(min=torch.finfo(torch.float32).tiny) / 127
    q = torch.round(x / scale[:, None]).clamp_(-127, 127)
    residual = (x - q * scale[:, None]).norm(dim=1)
    return q.to(torch.int8), scale, residual


def _tensor_key(t: torch.Tensor) -> tuple:
    """What identifies a tensor's current values: storage, layout, dtype and in-place version."""
    return (t.data_ptr(), tuple(t.shape), tuple(t.stride()), t.dtype, t.device, t._version)


class Int8Screen:
    """An int8 copy of a (V, d) table that answers exact argmaxes of h·E_v (module docstring)."""

    def __init__(self, weight: torch.Tensor) -> None:
        if weight.dim() != 2:
            raise ValueError(f"weight must be a (vocab, dim) table; got shape {tuple(weight.shape)}")
        self.weight = weight
        self._key = _tensor_key(weight)
        w = weight.detach().float()
        self.scale = float(w.abs().max().clamp(min=torch.finfo(torch.float32).tiny)) / 127
        q = torch.round(w / self.scale).clamp_(-127, 127)
        self.residual_norm = float((w - q * self.scale).norm(dim=1).max())  # max_v ||R_v||
        self.q_norm = float(q.norm(dim=1).max())  # max_v ||Q_v||
        self.weight_norm = float(w.norm(dim=1).max())  # max_v ||E_v||
        self.q = q.to(torch.int8)  # (V, d)

    def is_current(self, weight: torch.Tensor) -> bool:
        """Whether this screen was built from ``weight`` as it is now (same tensor, not modified since)."""
        return _tensor_key(weight) == self._key

    def _window(self, hidden: torch.Tensor, t: torch.Tensor, r_norm: torch.Tensor) -> tuple[torch.Tensor, float]:
        """The certified window in int32 screen units: width = base + slope·|best| per row (M,).

        ``best`` is the row's largest screen score. ``slope`` is 0 for fp32 references; a reference
        that rounds each logit to its output dtype (u = finfo.eps / 2) adds eps·|logit| for the
        logits in the window, |logit| <= |best|·t·s + eps + width, solved for the width. Since
        slope < 1, best - width never decreases as best grows: a window cut with a running best
        holds every id of the final one.
        """
        h_norm = hidden.float().norm(dim=1).double()
        eps = h_norm * self.residual_norm + self.scale * r_norm.double() * self.q_norm
        rho = hidden.shape[1] * 2.0**-24 * h_norm * self.weight_norm * 2  # fp32 accumulation, twice over
        unit = t.double() * self.scale  # one screen unit in logit units
        if hidden.dtype == torch.float32:
            return 2 * (eps + rho) / unit + 1, 0.0
        e = torch.finfo(hidden.dtype).eps
        rounding = e / (1 - 2 * e)
        return 2 * (eps + rho) * (1 + 3 * rounding) / unit + 1, 2 * rounding

    def candidates(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(row, id) pairs, rows ascending then ids ascending, containing every row's reference argmax."""
        q, t, r_norm = _quantize_rows(hidden.float())
        base, slope = self._window(hidden, t, r_norm)

        def threshold(best: torch.Tensor) -> torch.Tensor:  # (M,) int64 -> lowest score in the window
            return best - (base + slope * best.abs().double()).ceil().clamp(max=2**40).to(torch.int64)

        vocab, rows_n = self.q.shape[0], hidden.shape[0]
        best = torch.full((rows_n,), -(2**31), dtype=torch.int64)
        rows, ids, scores = [], [], []
        for start in range(0, vocab, BLOCK):
            block = torch._int_mm(q, self.q[start : start + BLOCK].t())  # (M, B) int32, exact
            size = block.shape[1] - block.shape[1] % GROUP
            groups = block[:, :size].view(rows_n, -1, GROUP).amax(-1)  # (M, B / GROUP)
            best = torch.maximum(best, groups.amax(1).to(torch.int64))
            if size < block.shape[1]:
                best = torch.maximum(best, block[:, size:].amax(1).to(torch.int64))
            low = threshold(best).clamp(min=-(2**31)).to(torch.int32)
            r, g = (groups >= low[:, None]).nonzero(as_tuple=True)
            cols = (g[:, None] * GROUP + torch.arange(GROUP)).reshape(-1)
            r = r.repeat_interleave(GROUP)
            if size < block.shape[1]:  # the last, partial group
                tail = torch.arange(size, block.shape[1])
                r = torch.cat([r, torch.arange(rows_n).repeat_interleave(tail.numel())])
                cols = torch.cat([cols, tail.repeat(rows_n)])
            score = block.view(-1).index_select(0, r * block.shape[1] + cols)  # flat: faster than block[r, cols]
            keep = score >= low[r]
            rows.append(r[keep])
            ids.append(cols[keep] + start)
            scores.append(score[keep])
        row, idx, score = torch.cat(rows), torch.cat(ids), torch.cat(scores).to(torch.int64)
        keep = score >= threshold(best)[row]  # the final window (earlier blocks saw a lower best)
        row, idx = row[keep], idx[keep]
        order = torch.sort(row * vocab + idx).indices
        return row[order], idx[order]

    def argmax(self, hidden: torch.Tensor) -> torch.Tensor:
        """argmax_v hidden·E_v for hidden (M, d) -> (M,) ids, as the reference matmul's argmax."""
        hidden = hidden.to(self.weight.dtype)
        if hidden.shape[0] == 0:
            return torch.zeros(0, dtype=torch.long, device=hidden.device)
        row, idx = self.candidates(hidden)
        counts = torch.bincount(row, minlength=hidden.shape[0]).tolist()
        out = torch.empty(hidden.shape[0], dtype=torch.long)
        start = 0
        for m, n in enumerate(counts):
            ids = idx[start : start + n]
            start += n
            if n == 0 or n > MAX_WINDOW_IDS:  # no ids: only possible with non-finite input
                out[m] = F.linear(hidden[m : m + 1], self.weight).argmax(-1)[0]
            else:
                ids = ids.sort().values  # ascending: exact ties go to the lowest id, as the reference argmax
                # one fp32 dot product per id, rounded as the matmul's output: a 1-row GEMV kernel may sum
                # identical rows differently (seen on Intel AMX CPUs) and so break exact ties the wrong way
                rows = self.weight.index_select(0, ids).float()
                logits = (rows * hidden[m].float()).sum(-1).to(self.weight.dtype)
                out[m] = ids[logits.argmax(-1)]
        return out
