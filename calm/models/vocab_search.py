"""Exact vocabulary argmax through a certified int8 screen (the cost of CALM decoding; CALM-SPEC §7).

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

import torch
import torch.nn.functional as F

BLOCK = 8192
"""Vocabulary ids per int8 block: the (rows, BLOCK) int32 block stays in cache while it is screened."""
GROUP = 16
"""Ids per group whose int32 maximum is compared first: only groups that reach the window are opened."""
MAX_WINDOW_IDS = 4096
"""A row with more ids than this in its window (a flat top) is re-scored over the whole vocabulary."""


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
