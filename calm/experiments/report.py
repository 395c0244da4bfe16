"""``calm report --run DIR``: rebuild a run's report (tables, verdict, plots) from its logged metrics.

Reads what the pipeline left in a run directory: ``autoencoder/`` and each language-model run's
``metrics.jsonl`` (training and validation records) and ``run_config.json`` (configs),
``eval_<run>.json`` (BrierLM on the evaluation set, ``calm eval``), ``autoencoder_eval.json``,
``samples.json``, ``prompt_following.json`` and ``generation_speed.json``. Writes ``report.md``: the
autoencoder's reconstruction, a table of every language model scored alike, the training FLOPs with
and without the autoencoder's training, the verdict (``calm.experiments.verdict``), the CALMs' head
diagnostics, the generations, and the plots (``calm.experiments.report_plots``). A run directory of
one model kind, or of the two-model layout (calm, gpt), is reported as far as it goes.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import fields
from pathlib import Path
from typing import Any

from calm.config import AutoencoderConfig, CALMConfig, config_from_dict, extensions_in_use
from calm.data.evalsets import eval_set_name
from calm.experiments.report_plots import make_plots
from calm.experiments.verdict import verdict_lines
from calm.io import atomic_write_text, read_json, read_jsonl
from calm.models.flops import ae_flops, run_flops

LM_NAMES: dict[str, str] = {"calm": "CALM", "calm_anchored": "CALM-anchored (ours)", "gpt": "GPT"}
"""Language-model runs a report looks for, run directory -> name in the report: the paper's CALM, ours
with the anchored head (``calm.experiments.demo.DEMO_RECIPE``), and the GPT baseline."""


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` ([] if it does not exist). A last line cut short (the run was
    stopped while writing it, or is still writing) is skipped with a warning (``calm.io.read_jsonl``)."""
    return read_jsonl(path) if path.exists() else []


def _read_json(path: Path) -> dict[str, Any] | None:
    return read_json(path) if path.exists() else None


def _model_flops(run: Path) -> dict[str, Any] | None:
    """Analytic FLOPs for the model of a training run (from its run_config.json), with its ``kind``."""
    cfg = _read_json(run / "run_config.json")
    return run_flops(cfg) if cfg is not None else None


def autoencoder_train_flops(run: Path, records: list[dict[str, Any]]) -> float | None:
    """Training FLOPs the autoencoder run ``run/autoencoder`` used: analytic FLOPs per token (encoder and
    decoder, forward and backward, ``calm.models.flops.ae_flops``) × the tokens it trained on (the last
    training record of ``records``, its metrics.jsonl). None without that run. The context term of ours
    (``context_weight``), a distance matrix between latents, is left out (under 1% at the tiny presets)."""
    cfg = _read_json(run / "autoencoder" / "run_config.json")
    train = [r for r in records if r.get("split") == "train"]
    if cfg is None or not train:
        return None
    return ae_flops(config_from_dict(AutoencoderConfig, cfg["model"]))["train_flops_per_token"] * train[-1]["tokens"]


def _summary_row(
    run: Path,
    name: str,
    records: list[dict[str, Any]],
    evaluation: dict[str, Any] | None,
    ae_train: float | None,
    speed: dict[str, float],
    flops: dict[str, Any] | None,
) -> dict[str, Any]:
    """One language model's row: its size, compute (``flops``: :func:`_model_flops`), scores on the
    evaluation set and speeds."""
    train = [r for r in records if r.get("split") == "train"]
    flops = flops or {}
    cfg = _read_json(run / name / "run_config.json") or {}
    tokens = train[-1]["tokens"] if train else 0
    rates = [r["tokens_per_s"] for r in train if "tokens_per_s" in r]
    evaluation = evaluation or {}
    lm_flops = flops.get("train_flops_per_token", 0) * tokens if flops else None
    return {
        "run": name,
        "model": LM_NAMES.get(name, name),
        "kind": flops.get("kind"),
        "anchored": bool(cfg.get("model", {}).get("token_anchor")),
        "params": flops.get("params"),
        "train_tokens": tokens,
        "lm_train_flops": lm_flops,
        "train_flops": lm_flops,
        "ae_train_flops": ae_train if flops.get("kind") == "calm" else None,
        "inference_flops_per_token": flops.get("inference_flops_per_token"),
        "train_tokens_per_s": statistics.median(rates) if rates else None,
        "train_minutes": (train[-1]["elapsed_s"] / 60) if train else None,
        "context_tokens": (evaluation.get("context") or {}).get("tokens"),
        "brierlm": evaluation.get("brierlm"),
        "brierlm_se": evaluation.get("brierlm_se"),
        "brier_n": [evaluation.get(f"brier{n}") for n in range(1, 5)] if evaluation else None,
        "brier_se": [evaluation.get(f"brier{n}_se") for n in range(1, 5)] if evaluation else [None] * 4,
        "perplexity": evaluation.get("perplexity"),
        "sample_tokens_per_s": speed.get(name),
    }


def _fmt(x: Any, spec: str = ".3g") -> str:
    if x is None:
        return "–"
    if isinstance(x, float | int):
        return format(x, spec)
    return str(x)


def _precision_lines(run: Path, runs: list[str]) -> list[str]:
    """Which precision each stage trained in (``train.precision`` of its run_config.json, resolved)."""
    used = []
    for name in ["autoencoder", *runs]:
        cfg = _read_json(run / name / "run_config.json")
        if cfg:
            train = cfg.get("train", {})
            asked = train.get("precision_requested")
            note = f" (from `{asked}`)" if asked and asked != train.get("precision") else ""
            used.append(f"{name} {train.get('precision', '?')}{note}")
    if not used:
        return []
    return [
        f"Training precision: {', '.join(used)}. Validation metrics during training are computed in fp32 "
        "whatever the training precision, so curves compare across precisions.",
        "",
    ]


def _options_lines(run: Path, runs: list[str]) -> list[str]:
    """The options beyond the paper each stage trained with (``calm.config.extensions_in_use``)."""
    used = []
    for name in ["autoencoder", *runs]:
        cfg = _read_json(run / name / "run_config.json") or {}
        cls = {"autoencoder": AutoencoderConfig, "calm": CALMConfig}.get(cfg.get("kind", name))
        if cls and cfg.get("model"):
            known = {k: v for k, v in cfg["model"].items() if k in {f.name for f in fields(cls)}}
            changed = extensions_in_use(cls(**known))
            if changed:
                used.append(f"{name} {', '.join(changed)}")
    if not used:
        return ["Every model follows the paper's recipe (no option of ours is on).", ""]
    lines = [
        f"Options beyond the paper (ours; docs/guides/extensions.md): {'; '.join(used)}; every other model "
        "follows the paper's recipe."
    ]
    if any("token_anchor=True" in u for u in used):
        lines[0] += (
            " With `token_anchor` each chunk's first token is drawn from a softmax readout of h, as a token"
            " model draws it, and the head draws the rest of the chunk: that model's Brier-1 scores the readout,"
            " Brier-2..4 the head as well."
        )
    return lines + [""]


def _diagnostics_lines(
    metrics: dict[str, list[dict[str, Any]]], evals: dict[str, dict[str, Any] | None], calms: list[str]
) -> list[str]:
    """Markdown for the CALMs' head diagnostics (ours): the last validation record and the evaluation set."""
    rows = []
    for name in calms:
        val = [r for r in metrics.get(name, []) if r.get("split") == "val" and "cond_gap" in r]
        sources = [("validation (end of training)", val[-1] if val else None)]
        sources.append(("evaluation set", (evals.get(name) or {}).get("head_diagnostics")))
        rows += [(LM_NAMES.get(name, name), data, d) for data, d in sources if d]
    if not rows:
        return []
    lines = [
        "## Do the CALMs' heads use their context? (diagnostics of ours)",
        "",
        "| model | data | conditioning gap ± SE | energy loss | noise floor | marginal | gap closed "
        "| first-token acc (mean of 32 / one sample) | chunk acc (mean / one) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for model, data, d in rows:
        lines.append(
            f"| {model} | {data} | {d['cond_gap']:.3f} ± {d['cond_gap_se']:.3f} | {d['diag_energy_loss']:.3f} "
            f"| {d['noise_floor']:.3f} | {d['marginal_distance']:.3f} | {d['gap_closed']:.2%} "
            f"| {d['first_token_acc_point']:.2%} / {d['first_token_acc_sample']:.2%} "
            f"| {d['chunk_acc_point']:.2%} / {d['chunk_acc_sample']:.2%} |"
        )
    lines += [
        "",
        "Conditioning gap: energy score with each position's own hidden state minus with hidden states shuffled "
        "across positions (same targets and noise; 0 = the head ignores its context). Gap closed: (marginal − loss) / "
        "(marginal − noise floor), 0 for the best context-free head, 1 at the noise floor. For an anchored head "
        "the head is conditioned on the drawn first token as well, so its gap and accuracies include what the "
        "readout carries. See `calm/eval/diagnostics.py`.",
        "",
    ]
    return lines


def _md_text(text: str) -> str:
    """Model text as one inline Markdown run: special characters escaped, line breaks shown as ⏎."""
    for ch in "\\`*_[]<>|#":
        text = text.replace(ch, "\\" + ch)
    return text.replace("\r\n", " ⏎ ").replace("\n", " ⏎ ").strip() or "(nothing)"


def _prompt_following_lines(result: dict[str, Any] | None) -> list[str]:
    """The prompt retrieval AUC table (``calm.eval.prompt_following``) and one example, if the run has it."""
    if not result:
        return []
    s = result["settings"]
    lines = [
        "## Do continuations follow their prompts?",
        "",
        f"Prompt retrieval AUC (`calm follow`): {s['prompts']} validation documents, each model continues the "
        f"first {s['prompt_tokens']} tokens by {s['new_tokens']} at T = {s['temperature']:g} (seed {s['seed']}); "
        "a continuation scores how often its own prompt explains it better than another prompt does (unigram "
        "retrieval, rare shared tokens weigh most). 0.5: the continuation ignores its prompt; the real text "
        "of the same documents gives the ceiling.",
        "",
        "| continuation | AUC ± SE | mean new tokens |",
        "|---|---|---|",
    ]
    labels = {name: {"reference": "real text", **LM_NAMES}.get(name, name) for name in result["results"]}
    for name, r in result["results"].items():
        lines.append(f"| {labels[name]} | {r['auc']:.3f} ± {r['auc_se']:.3f} | {r['mean_new_tokens']:.1f} |")
    lines.append("")
    for example in result["examples"][:1]:
        lines += [f"Example prompt (its end): …{_md_text(example['prompt'][-160:])}", ""]
        lines += [f"- {labels[name]}: {_md_text(example[name])}" for name in result["results"]] + [""]
    return lines


def write_report(run: str | Path) -> Path:
    """Write ``run/report.md`` (and plots) from whatever the run has logged; return its path.

    Raises FileNotFoundError when ``run`` is not a directory or holds no training run to report on.
    """
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run} does not exist")
    runs = [name for name in LM_NAMES if (run / name).exists()]
    if not runs and not (run / "autoencoder").exists():
        raise FileNotFoundError(f"{run} has no autoencoder/ or language-model run ({', '.join(LM_NAMES)}) to report on")
    evals = {name: _read_json(run / f"eval_{name}.json") for name in runs}
    # Each metrics.jsonl is read once, so a torn last line is reported once.
    metrics = {name: read_metrics(run / name / "metrics.jsonl") for name in ["autoencoder", *runs]}
    speed = _speeds(_read_json(run / "generation_speed.json") or {})
    ae_train = autoencoder_train_flops(run, metrics["autoencoder"])
    flops = {name: _model_flops(run / name) for name in runs}
    rows = [_summary_row(run, name, metrics[name], evals[name], ae_train, speed, flops[name]) for name in runs]
    plots = make_plots(run, rows, metrics, {name: LM_NAMES[name] for name in runs}, flops)
    lines = ["# CALM vs GPT: run report", "", f"Run directory: `{run}`", "", *_options_lines(run, runs)]
    lines += _autoencoder_lines(_read_json(run / "autoencoder_eval.json"))
    if rows:
        lines += _table_lines(rows, evals)
        lines += verdict_lines(rows, evals, speed)
    lines += _precision_lines(run, runs)
    lines += _diagnostics_lines(metrics, evals, [r["run"] for r in rows if r["kind"] == "calm"])
    for name in plots:
        lines += [f"![{name}]({name})", ""]
    if not plots:
        lines += ["(plots skipped: install the optional extra `calm-lm[plot]` for matplotlib)", ""]
    lines += _generation_lines(_read_json(run / "samples.json"))
    lines += _prompt_following_lines(_read_json(run / "prompt_following.json"))
    path = run / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _speeds(speed: dict[str, Any]) -> dict[str, float]:
    """run -> tokens/s from ``generation_speed.json`` (``tokens_per_s``; older runs: ``<run>_tokens_per_s``)."""
    if "tokens_per_s" in speed:
        return dict(speed["tokens_per_s"])
    return {k.removesuffix("_tokens_per_s"): v for k, v in speed.items() if k.endswith("_tokens_per_s")}


def _autoencoder_lines(ae_eval: dict[str, Any] | None) -> list[str]:
    if not ae_eval:
        return []
    data = eval_set_name(ae_eval["data"]) if "data" in ae_eval else "WikiText-103 test"
    return [
        f"## Autoencoder ({data})",
        "",
        "| token accuracy (decode μ) | token accuracy (decode z ~ q) | chunk exact match | text tokens |",
        "|---|---|---|---|",
        f"| {ae_eval['token_accuracy']:.4%} | {ae_eval['token_accuracy_sampled']:.4%} | "
        f"{ae_eval['chunk_exact_match']:.4%} | {ae_eval['tokens']:,} |",
        "",
    ]


def _brier_text(r: dict[str, Any]) -> str:
    if r["brierlm"] is None:
        return "–"
    if r["brierlm_se"] is None or math.isnan(r["brierlm_se"]):
        return f"{r['brierlm']:.3f}"
    return f"{r['brierlm']:.3f} ± {r['brierlm_se']:.3f}"


def _table_lines(rows: list[dict[str, Any]], evals: dict[str, dict[str, Any] | None]) -> list[str]:
    """The side-by-side table: every language model, scored on the same evaluation blocks."""
    lines = [
        "## Side by side",
        "",
        "| model | params | context (tokens) | train tokens | LM training FLOPs | + autoencoder training "
        "| inference FLOPs/token | BrierLM ± SE | Brier-1..4 (%) ± SE | perplexity | train tokens/s "
        "| sampling tokens/s (T = 1) | train minutes |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        brier_n = " / ".join(
            f"{b:.2f} ± {se:.2f}" if se is not None else _fmt(b, ".2f")
            for b, se in zip(r["brier_n"] or [], r["brier_se"])
        )
        with_ae = r["lm_train_flops"] + r["ae_train_flops"] if r["ae_train_flops"] and r["lm_train_flops"] else None
        lines.append(
            f"| {r['model']} | {_fmt(r['params'] and r['params'] / 1e6, '.2f')}M | {_fmt(r['context_tokens'], ',')} "
            f"| {_fmt(r['train_tokens'], ',')} | {_fmt(r['lm_train_flops'], '.3g')} | {_fmt(with_ae, '.3g')} "
            f"| {_fmt(r['inference_flops_per_token'], '.3g')} | {_brier_text(r)} | {brier_n or '–'} "
            f"| {_fmt(r['perplexity'], '.2f')} | {_fmt(r['train_tokens_per_s'], ',.0f')} "
            f"| {_fmt(r['sample_tokens_per_s'], ',.0f')} | {_fmt(r['train_minutes'], '.1f')} |"
        )
    first = next((e for e in evals.values() if e), {})
    contexts = sorted({r["context_tokens"] for r in rows if r["context_tokens"]})
    same = "every model with the same blocks" if len(contexts) == 1 else "NOT the same context for every model"
    lines += [
        "",
        f"Scored on {eval_set_name(first['data']) if first.get('data') else 'the evaluation set'}, the first "
        f"{_fmt(first.get('tokens'), ',')} tokens, "
        f"{same}. BrierLM is ×100 (paper convention); ± is one standard error clustered by block. BrierLM is 0 "
        "when any Brier-n is <= 0 (a model worse than chance on n-grams), so Brier-1..4 are shown too. Perplexity "
        "exists for token models only: CALM has no likelihood. FLOPs are analytic (`calm flops`): LM training "
        "FLOPs are what the comparison holds equal; the next column adds the autoencoder's training, which the "
        "CALMs need and share (the paper's accounting leaves it out). Sampling tokens/s: T = 1, batch 1, KV cache, "
        "median of 3 (`generation_speed.json`).",
        "",
    ]
    return lines


def _generation_lines(samples: list[dict[str, Any]] | None) -> list[str]:
    if not samples:
        return []
    lines = ["## Generations", ""]
    for s in samples:
        lines += [f"**T = {s['temperature']:g}**, prompt `{s['prompt']}`", ""]
        for name in LM_NAMES:
            if name in s:
                lines.append(f"- {LM_NAMES[name]}: {_md_text(s['prompt'])} → {_md_text(s[name])}")
        lines.append("")
    return lines
