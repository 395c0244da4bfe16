"""The run report's verdict: each CALM's Brier-n as a ratio to the GPT's, with standard errors, in words.

Ours (the paper reports Brier-n and BrierLM, not ratios). Each ratio is the mean Brier-n of one model
over the mean Brier-n of the reference (the GPT) on the same evaluation blocks, with the paired,
block-clustered delta-method standard error of :func:`calm.eval.brierlm.ratio_of_means`. A ratio is
given only where the reference's Brier-n is more than two standard errors above 0; otherwise the
text says why there is none. The paragraph also says what each Brier-n measures for each kind of
model (paper §5), which compute is held equal, and what the run's scale can and cannot show about
the paper's claim (paper §7: CALM matches a Transformer at 44% less training compute at 1e20+ FLOPs).
"""

from __future__ import annotations

import math
from typing import Any

from calm.eval.brierlm import ratio_of_means

PAPER_SCALE_FLOPS = 1e20
"""Order of the training compute at which the paper compares CALM with Transformers (paper §7, Fig. 5)."""


def brier_ratios(model: dict[str, Any], reference: dict[str, Any], n_max: int = 4) -> list[dict[str, Any]]:
    """Brier-1..n_max of ``model`` over ``reference`` (two ``calm eval`` results) with standard errors.

    Each entry: ``n``, and either ``ratio``, ``se`` and ``paired`` (both scored the same blocks: same data,
    context in tokens and number of blocks) or ``none`` (why no ratio: the reference's Brier-n is not
    clearly above 0, or a result has no per-block totals).
    """
    a, b = model.get("per_block"), reference.get("per_block")
    paired = (
        bool(a and b)
        and all(model.get(k) == reference.get(k) for k in ("data", "tokens", "blocks"))
        and (model.get("context") or {}).get("tokens") == (reference.get("context") or {}).get("tokens")
    )
    out = []
    for n in range(1, n_max + 1):
        ref, ref_se = reference.get(f"brier{n}"), reference.get(f"brier{n}_se")
        if not a or not b:
            out.append({"n": n, "none": "an evaluation result has no per-block totals (rerun `calm eval`)"})
            continue
        if ref is None or ref_se is None or not ref > 2 * ref_se:
            se_text = "n/a" if ref_se is None else f"{ref_se:.2f}"
            reason = "the GPT's Brier-n is not clearly above 0"
            out.append({"n": n, "none": reason, "reference": f"{ref:.2f} ± {se_text}%"})
            continue
        ratio, se = ratio_of_means(
            [s[n - 1] for s in a["sums"]],
            a["positions"],
            [s[n - 1] for s in b["sums"]],
            b["positions"],
            paired=paired,
        )
        out.append({"n": n, "ratio": ratio, "se": se, "paired": paired})
    return out


def _scoring_sentence(rows: list[dict[str, Any]], evals: dict[str, dict[str, Any] | None], budget: float) -> str:
    """How the models were trained and scored: compute, seeds, blocks and context, checked rather than assumed."""
    scored = [evals[r["run"]] for r in rows if evals.get(r["run"])]
    contexts = {(e.get("context") or {}).get("tokens") for e in scored}
    blocks = {(e.get("data"), e.get("tokens"), e.get("blocks")) for e in scored}
    text = f"Each model was trained once (one seed) with {budget:.2g} language-model training FLOPs. "
    if len(contexts) == 1 and len(blocks) == 1:
        e = scored[0]
        context = contexts.pop()
        text += (
            f"All were scored on the same {e['blocks']} blocks of {context} tokens ({e['tokens']:,} tokens) of the "
            f"evaluation set, every model with {context} tokens of context. Ratios are to the GPT's Brier-n, ± one "
            "paired standard error clustered by block."
        )
    else:
        each = ", ".join(
            f"{r['model']} {(evals[r['run']].get('context') or {}).get('tokens')}" for r in rows if evals.get(r["run"])
        )
        text += (
            f"The models were NOT scored alike (context in tokens: {each}); rescore them with the same "
            "`calm eval --context-tokens` before reading these ratios (± treats the two scores as independent)."
        )
    return text


def _ratios_text(ratios: list[dict[str, Any]]) -> str:
    """The ratios of one model; the Brier-n without one are named together, with their reason(s) once."""
    parts = [_ratio_text(r) for r in ratios if "none" not in r]
    missing = [r for r in ratios if "none" in r]
    for reason in dict.fromkeys(r["none"] for r in missing):
        group = [r for r in missing if r["none"] == reason]
        names = ", ".join(f"Brier-{r['n']}" for r in group)
        values = ", ".join(r["reference"] for r in group if "reference" in r)
        parts.append(f"no ratio for {names} ({reason}{': ' + values if values else ''})")
    return "; ".join(parts)


def _ratio_text(r: dict[str, Any]) -> str:
    se = "n/a" if math.isnan(r["se"]) else f"{r['se']:.2f}"
    return f"Brier-{r['n']} {r['ratio']:.2f}× ± {se}"


def _what_brier_measures(row: dict[str, Any]) -> str:
    if row["kind"] != "calm":
        return (
            "Brier-n scores its prediction of the next n tokens (exact form: the true n tokens' probability and "
            "the collision along a sampled path)"
        )
    if row.get("anchored"):
        return (
            "its Brier-1 scores the softmax readout that draws each chunk's first token (a token prediction at "
            "chunk starts, not next-vector prediction); Brier-2..4 score the head's latent as well"
        )
    return "Brier-n scores the first n tokens of two chunks drawn by the energy head, decoded: next-vector prediction"


def verdict_lines(
    rows: list[dict[str, Any]],
    evals: dict[str, dict[str, Any] | None],
    speed: dict[str, float],
    reference: str = "gpt",
) -> list[str]:
    """Markdown for the report's verdict: one paragraph per compared model, then the scale and the speeds.

    ``rows``: the report's summary rows (``run``, ``model``, ``kind``, ``anchored``, ``lm_train_flops``,
    ``ae_train_flops``, ``inference_flops_per_token``); ``evals``: run -> ``calm eval`` result;
    ``speed``: run -> tokens/s sampling at T = 1. Returns [] without the reference's evaluation.
    """
    by_run = {r["run"]: r for r in rows}
    ref_eval, ref_row = evals.get(reference), by_run.get(reference)
    if not ref_eval or not ref_row:
        return []
    budget = ref_row["lm_train_flops"]
    lines = ["## Verdict", "", _scoring_sentence(rows, evals, budget), ""]
    for row in rows:
        if row["run"] == reference or not evals.get(row["run"]):
            continue
        ratios = _ratios_text(brier_ratios(evals[row["run"]], ref_eval))
        total = row["lm_train_flops"] + (row["ae_train_flops"] or 0)
        ae = (
            f" Counting its autoencoder's training ({row['ae_train_flops']:.2g} FLOPs, shared by the CALMs), it used "
            f"{total:.2g} FLOPs, {total / budget:.2f}× the GPT's."
            if row["ae_train_flops"]
            else ""
        )
        lines.append(f"- **{row['model']}**: {ratios}. Here {_what_brier_measures(row)}.{ae}")
    lines.append(f"- **GPT**: {_what_brier_measures(ref_row)}.")
    lines += ["", *_scale_lines(budget, rows, speed, reference), ""]
    return lines


def _scale_lines(budget: float, rows: list[dict[str, Any]], speed: dict[str, float], reference: str) -> list[str]:
    orders = math.log10(PAPER_SCALE_FLOPS / budget) if budget else math.nan
    text = (
        f"What this scale can show: the paper compares models at about {PAPER_SCALE_FLOPS:.0e} training FLOPs with "
        f"billions of tokens; this run is about {orders:.0f} orders of magnitude smaller. "
        "It checks that every stage works and how these recipes rank on a tiny backbone; it can neither confirm "
        "nor refute the paper's claim that CALM matches a Transformer with 44% less training compute."
    )
    ref = speed.get(reference)
    parts = []
    by_run = {r["run"]: r for r in rows}
    for run_name, tps in speed.items():
        if run_name != reference and ref and run_name in by_run:
            ratio = by_run[run_name]["inference_flops_per_token"] / by_run[reference]["inference_flops_per_token"]
            parts.append(
                f"{by_run[run_name]['model']} {tps / ref:.2f}× the GPT's tokens/s at {ratio:.2f}× its inference "
                "FLOPs per token"
            )
    if parts:
        text += (
            " Speeds time sampling at T = 1 (batch 1, KV cache, on this machine; CALM one head sample per step): "
            + "; ".join(parts)
            + ". Analytic inference FLOPs per token are what the paper's inference claim is about."
        )
    return [text]
