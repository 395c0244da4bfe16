"""``calm report --run DIR``: rebuild a run's report (table + plots) from its logged metrics.

Reads what the pipeline left in a run directory: ``{autoencoder,calm,gpt}/metrics.jsonl`` (training
and validation records), ``run_config.json`` (configs), ``eval_{calm,gpt}.json`` (BrierLM on the
evaluation set), ``autoencoder_eval.json`` and ``samples.json``. Writes ``report.md`` and PNG
plots: training curves, BrierLM against training FLOPs and against inference FLOPs per token
(the paper's Table 1 / Fig. 5 axes), and CALM's head diagnostics (``calm.eval.diagnostics``). matplotlib
is an optional extra; without it the report is written without plots and says so.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import fields
from pathlib import Path
from typing import Any

from calm.config import AutoencoderConfig, CALMConfig, GPTConfig, config_from_dict, extensions_in_use
from calm.io import atomic_file, atomic_write_text, read_json, read_jsonl
from calm.models.flops import calm_flops, gpt_flops


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` ([] if it does not exist). A last line cut short (the run was
    stopped while writing it, or is still writing) is skipped with a warning (``calm.io.read_jsonl``)."""
    return read_jsonl(path) if path.exists() else []


def _read_json(path: Path) -> dict[str, Any] | None:
    return read_json(path) if path.exists() else None


def _save_figure(fig: Any, path: Path, plt: Any) -> None:
    """Write ``fig`` to ``path`` as a PNG, atomically (a crash leaves the previous plot, not half a file)."""
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=110, format="png")
    finally:
        plt.close(fig)


def _model_flops(run: Path) -> dict[str, Any] | None:
    """Analytic FLOPs for the model of a training run (from its run_config.json)."""
    cfg = _read_json(run / "run_config.json")
    if cfg is None:
        return None
    if cfg["kind"] == "calm":
        model = config_from_dict(CALMConfig, cfg["model"])
        ae = config_from_dict(AutoencoderConfig, cfg["autoencoder"])
        return calm_flops(model, ae, context=cfg["train"]["block_size"] // model.chunk_size)
    if cfg["kind"] == "gpt":
        return gpt_flops(config_from_dict(GPTConfig, cfg["model"]), context=cfg["train"]["block_size"])
    return None


def _summary_row(
    run: Path, kind: str, records: list[dict[str, Any]], evaluation: dict[str, Any] | None
) -> dict[str, Any]:
    train = [r for r in records if r.get("split") == "train"]
    flops = _model_flops(run) or {}
    tokens = train[-1]["tokens"] if train else 0
    rates = [r["tokens_per_s"] for r in train if "tokens_per_s" in r]
    speed = _read_json(run.parent / "generation_speed.json") or {}
    return {
        "model": kind.upper(),
        "params": flops.get("params"),
        "train_tokens": tokens,
        "train_flops": flops.get("train_flops_per_token", 0) * tokens if flops else None,
        "inference_flops_per_token": flops.get("inference_flops_per_token"),
        "train_tokens_per_s": statistics.median(rates) if rates else None,
        "train_minutes": (train[-1]["elapsed_s"] / 60) if train else None,
        "brierlm": evaluation.get("brierlm") if evaluation else None,
        "brierlm_se": evaluation.get("brierlm_se") if evaluation else None,
        "brier_n": [evaluation.get(f"brier{n}") for n in range(1, 5)] if evaluation else None,
        "perplexity": evaluation.get("perplexity") if evaluation else None,
        "generate_tokens_per_s": speed.get(f"{kind}_tokens_per_s"),
    }


def _fmt(x: Any, spec: str = ".3g") -> str:
    if x is None:
        return "–"
    if isinstance(x, float | int):
        return format(x, spec)
    return str(x)


def _plots(run: Path, rows: list[dict[str, Any]], metrics: dict[str, list[dict[str, Any]]]) -> list[str]:
    """Write the run's PNG plots; return their file names ([] without matplotlib)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    made = []
    ae = metrics["autoencoder"]
    lm = {k: metrics[k] for k in ("calm", "gpt")}
    _training_curves_plot(run, ae, lm, plt)
    made.append("training_curves.png")
    _brierlm_vs_flops_plot(run, lm, rows, plt)
    made.append("brierlm_vs_flops.png")
    if _brier_n_plot(run, lm, plt):
        made.append("brier_n_vs_flops.png")
    if _diagnostics_plot(run, lm["calm"], plt):
        made.append("head_diagnostics.png")
    return made


def _training_curves_plot(run: Path, ae: list[dict[str, Any]], lm: dict[str, list[dict[str, Any]]], plt: Any) -> None:
    """training_curves.png: the autoencoder's validation accuracy, CALM's and the GPT's training loss."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    val = [r for r in ae if r.get("split") == "val"]
    if val:
        axes[0].plot(
            [r["elapsed_s"] / 60 for r in val],
            [100 * r["token_accuracy"] for r in val],
            "o-",
            label="decode μ",
        )
        axes[0].plot(
            [r["elapsed_s"] / 60 for r in val],
            [100 * r["token_accuracy_sampled"] for r in val],
            "s--",
            label="decode z~q",
        )
        axes[0].set(xlabel="training minutes", ylabel="token accuracy (%)", title="Autoencoder reconstruction (val)")
        axes[0].legend()
    for kind, ax in (("calm", axes[1]), ("gpt", axes[2])):
        cfg = _read_json(run / kind / "run_config.json") or {}
        key = f"{cfg.get('model', {}).get('head', 'energy')}_loss" if kind == "calm" else "loss"  # the head's own
        tr = [r for r in lm[kind] if r.get("split") == "train" and key in r]
        if tr:
            ax.plot([r["tokens"] / 1e6 for r in tr], [r[key] for r in tr])
            ax.set(xlabel="training tokens (M)", ylabel=key, title=f"{kind.upper()} training loss")
    fig.tight_layout()
    _save_figure(fig, run / "training_curves.png", plt)


def _brierlm_vs_flops_plot(
    run: Path, lm: dict[str, list[dict[str, Any]]], rows: list[dict[str, Any]], plt: Any
) -> None:
    """brierlm_vs_flops.png: BrierLM and Brier-1 against training FLOPs (validation curves and the test
    results), and the test BrierLM against inference FLOPs per token."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for kind, marker in (("calm", "o"), ("gpt", "s")):
        val = [r for r in lm[kind] if r.get("split") == "val" and "brierlm" in r]
        flops = _model_flops(run / kind)
        if val and flops:
            x = [flops["train_flops_per_token"] * r["tokens"] for r in val]
            axes[0].plot(x, [r["brierlm"] for r in val], marker + "-", label=f"{kind.upper()} (validation)")
            axes[2].plot(x, [r["brier1"] for r in val], marker + "-", label=f"{kind.upper()} (validation)")
    for row, marker in zip(rows, ("o", "s")):
        if row["brierlm"] is not None and row["train_flops"]:
            axes[0].plot(
                [row["train_flops"]],
                [row["brierlm"]],
                marker,
                ms=11,
                mfc="none",
                label=f"{row['model']} (test)",
            )
            axes[1].errorbar(
                [row["inference_flops_per_token"]],
                [row["brierlm"]],
                yerr=[row["brierlm_se"] or 0],
                fmt=marker,
                ms=9,
                capsize=4,
                label=row["model"],
            )
    axes[0].set(xscale="log", xlabel="training FLOPs", ylabel="BrierLM", title="BrierLM vs training compute")
    axes[2].set(xscale="log", xlabel="training FLOPs", ylabel="Brier-1 (%)", title="Brier-1 vs training compute")
    axes[1].set(
        xlabel="inference FLOPs per token",
        ylabel="BrierLM (WikiText-103 test)",
        title="BrierLM vs inference cost",
    )
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    _save_figure(fig, run / "brierlm_vs_flops.png", plt)


def _precision_lines(run: Path) -> list[str]:
    """Which precision each stage trained in (``train.precision`` of its run_config.json, resolved)."""
    used = []
    for kind in ("autoencoder", "calm", "gpt"):
        cfg = _read_json(run / kind / "run_config.json")
        if cfg:
            train = cfg.get("train", {})
            asked = train.get("precision_requested")
            note = f" (from `{asked}`)" if asked and asked != train.get("precision") else ""
            used.append(f"{kind} {train.get('precision', '?')}{note}")
    if not used:
        return []
    return [
        f"Training precision: {', '.join(used)}. Validation metrics during training are computed in fp32 "
        "whatever the training precision, so curves compare across precisions.",
        "",
    ]


def _options_lines(run: Path) -> list[str]:
    """The options beyond the paper each stage trained with (``calm.config.extensions_in_use``)."""
    used = []
    for kind, cls in (("autoencoder", AutoencoderConfig), ("calm", CALMConfig)):
        model = (_read_json(run / kind / "run_config.json") or {}).get("model")
        if model:
            known = {k: v for k, v in model.items() if k in {f.name for f in fields(cls)}}
            changed = extensions_in_use(cls(**known))
            if changed:
                used.append(f"{kind} {', '.join(changed)}")
    if not used:
        return []
    lines = [f"Options beyond the paper (ours; docs/guides/extensions.md): {'; '.join(used)}."]
    if any("token_anchor=True" in u for u in used):
        lines[0] += (
            " With `token_anchor` each chunk's first token is drawn from a softmax readout of h, as a token"
            " model draws it, and the head draws the rest of the chunk: CALM's Brier-1 scores that readout,"
            " Brier-2..4 the head as well."
        )
    return lines + [""]


def _brier_n_plot(run: Path, lm: dict[str, list[dict[str, Any]]], plt: Any) -> bool:
    """Validation Brier-1..4 of both models against training FLOPs (the paper compares at equal compute)."""
    series = {}
    for kind in ("calm", "gpt"):
        val = [r for r in lm[kind] if r.get("split") == "val" and "brier1" in r]
        flops = _model_flops(run / kind)
        if val and flops:
            series[kind] = ([flops["train_flops_per_token"] * r["tokens"] for r in val], val)
    if not series:
        return False
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    for n, ax in enumerate(axes, start=1):
        for kind, marker in (("calm", "o"), ("gpt", "s")):
            if kind in series:
                x, val = series[kind]
                ax.plot(x, [r[f"brier{n}"] for r in val], marker + "-", label=kind.upper())
        ax.axhline(0.0, color="gray", lw=0.8)
        ax.set(xscale="log", xlabel="training FLOPs", ylabel=f"Brier-{n} (%)", title=f"Brier-{n} (validation)")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    _save_figure(fig, run / "brier_n_vs_flops.png", plt)
    return True


def _diagnostics_plot(run: Path, records: list[dict[str, Any]], plt: Any) -> bool:
    """CALM's head diagnostics (``calm.eval.diagnostics``) at each validation, against training FLOPs."""
    val = [r for r in records if r.get("split") == "val" and "cond_gap" in r]
    flops = _model_flops(run / "calm")
    if not val or not flops:
        return False
    x = [flops["train_flops_per_token"] * r["tokens"] for r in val]
    fig, axes = plt.subplots(1, 4, figsize=(21, 4))
    axes[0].errorbar(x, [r["cond_gap"] for r in val], yerr=[r["cond_gap_se"] for r in val], fmt="o-", capsize=3)
    axes[0].axhline(0.0, color="gray", lw=0.8)
    axes[0].set(ylabel="energy score: own h − shuffled h", title="Conditioning gap (> 0: head uses context)")
    axes[3].plot(x, [100 * r["gap_closed"] for r in val], "o-")
    axes[3].axhline(0.0, color="gray", lw=0.8)
    axes[3].set(ylabel="% of (marginal − noise floor)", title="Achievable gap closed (0: best context-free)")
    axes[1].plot(x, [r["diag_energy_loss"] for r in val], "o-", label="energy loss (own h)")
    axes[1].plot(x, [r["diag_energy_loss_shuffled"] for r in val], "s--", label="energy loss (shuffled h)")
    axes[1].plot(x, [r["marginal_distance"] for r in val], ":", color="gray", label="marginal (best context-free)")
    axes[1].plot(x, [r["noise_floor"] for r in val], "-.", color="gray", label="noise floor")
    axes[1].set(ylabel="latent distance^α", title="Loss between its bounds")
    for key, style, label in (
        ("first_token_acc_point", "o-", "first token, mean of 32 samples"),
        ("first_token_acc_sample", "s--", "first token, one sample"),
        ("chunk_acc_point", "^-", "whole chunk, mean of 32 samples"),
    ):
        axes[2].plot(x, [100 * r[key] for r in val], style, label=label)
    axes[2].set(ylabel="accuracy (%)", title="Teacher-forced next-chunk accuracy")
    for ax in axes:
        ax.set(xscale="log", xlabel="training FLOPs")
        ax.grid(alpha=0.3)
    for ax in axes[1:3]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    _save_figure(fig, run / "head_diagnostics.png", plt)
    return True


def _diagnostics_lines(records: list[dict[str, Any]], evaluation: dict[str, Any] | None) -> list[str]:
    """Markdown for CALM's head diagnostics: the last validation record and the evaluation set."""
    val = [r for r in records if r.get("split") == "val" and "cond_gap" in r]
    sources = [("validation (end of training)", val[-1] if val else None)]
    sources.append(("evaluation set", (evaluation or {}).get("head_diagnostics")))
    rows = [(name, d) for name, d in sources if d]
    if not rows:
        return []
    lines = [
        "## Does CALM's head use its context?",
        "",
        "| data | conditioning gap ± SE | energy loss | noise floor | marginal | gap closed "
        "| first-token acc (mean of 32 / one sample) | chunk acc (mean / one) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, d in rows:
        lines.append(
            f"| {name} | {d['cond_gap']:.3f} ± {d['cond_gap_se']:.3f} | {d['diag_energy_loss']:.3f} "
            f"| {d['noise_floor']:.3f} | {d['marginal_distance']:.3f} | {d['gap_closed']:.2%} "
            f"| {d['first_token_acc_point']:.2%} / {d['first_token_acc_sample']:.2%} "
            f"| {d['chunk_acc_point']:.2%} / {d['chunk_acc_sample']:.2%} |"
        )
    lines += [
        "",
        "Conditioning gap: energy score with each position's own hidden state minus with hidden states shuffled "
        "across positions (same targets and noise; 0 = the head ignores its context). Gap closed: (marginal − loss) / "
        "(marginal − noise floor), 0 for the best context-free head, 1 at the noise floor. "
        "See `calm/eval/diagnostics.py`.",
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
    labels = {
        name: {"reference": "real text", "calm": "CALM", "gpt": "GPT"}.get(name, name) for name in result["results"]
    }
    for name, r in result["results"].items():
        lines.append(f"| {labels[name]} | {r['auc']:.3f} ± {r['auc_se']:.3f} | {r['mean_new_tokens']:.1f} |")
    lines.append("")
    for example in result["examples"][:1]:
        lines += [f"Example prompt (its end): …{_md_text(example['prompt'][-160:])}", ""]
        lines += [f"- {labels[name]}: {_md_text(example[name])}" for name in result["results"]] + [""]
    return lines


def write_report(run: str | Path) -> Path:
    """Write ``run/report.md`` (and plots) from whatever the run has logged; return its path."""
    run = Path(run)
    if not run.is_dir():
        raise FileNotFoundError(f"run directory {run} does not exist")
    evals = {k: _read_json(run / f"eval_{k}.json") for k in ("calm", "gpt")}
    # Each metrics.jsonl is read once, so a torn last line is reported once.
    metrics = {k: read_metrics(run / k / "metrics.jsonl") for k in ("autoencoder", "calm", "gpt")}
    rows = [_summary_row(run / k, k, metrics[k], evals[k]) for k in ("calm", "gpt") if (run / k).exists()]
    if not rows and not (run / "autoencoder").exists():
        raise FileNotFoundError(f"{run} has no autoencoder/, calm/ or gpt/ training run to report on")
    plots = _plots(run, rows, metrics)
    lines = ["# CALM vs GPT: run report", "", f"Run directory: `{run}`", "", *_options_lines(run)]
    ae_eval = _read_json(run / "autoencoder_eval.json")
    if ae_eval:
        lines += [
            "## Autoencoder (WikiText-103 test)",
            "",
            "| token accuracy (decode μ) | token accuracy (decode z ~ q) | chunk exact match | text tokens |",
            "|---|---|---|---|",
            f"| {ae_eval['token_accuracy']:.4%} | {ae_eval['token_accuracy_sampled']:.4%} | "
            f"{ae_eval['chunk_exact_match']:.4%} | {ae_eval['tokens']:,} |",
            "",
        ]
    if rows:
        lines += [
            "## Side by side",
            "",
            "| model | params | train tokens | train FLOPs | inference FLOPs/token | BrierLM ± SE | Brier-1..4 (%) "
            "| perplexity | train tokens/s | generate tokens/s | train minutes |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            if r["brierlm"] is None:
                brier = "–"
            elif r["brierlm_se"] is None or math.isnan(r["brierlm_se"]):
                brier = f"{r['brierlm']:.3f}"
            else:
                brier = f"{r['brierlm']:.3f} ± {r['brierlm_se']:.3f}"
            lines.append(
                f"| {r['model']} | {_fmt(r['params'] and r['params'] / 1e6, '.2f')}M | {_fmt(r['train_tokens'], ',')} "
                f"| {_fmt(r['train_flops'], '.3g')} | {_fmt(r['inference_flops_per_token'], '.3g')} | {brier} "
                f"| {' / '.join(_fmt(b, '.2f') for b in r['brier_n']) if r['brier_n'] else '–'} "
                f"| {_fmt(r['perplexity'], '.2f')} | {_fmt(r['train_tokens_per_s'], ',.0f')} "
                f"| {_fmt(r['generate_tokens_per_s'], ',.0f')} | {_fmt(r['train_minutes'], '.1f')} |"
            )
        ctx = (evals.get("calm") or evals.get("gpt") or {}).get("context", {})
        lines += [
            "",
            f"BrierLM is ×100 (paper convention), estimated on the evaluation set with the context "
            f"`{ctx.get('description', 'n/a')}`; ± is one standard error (clustered by block). BrierLM is 0 "
            "when any Brier-n is <= 0 (a model worse than chance on n-grams), so Brier-1..4 are shown too. Perplexity "
            "exists for the GPT only: CALM has no likelihood. FLOPs are analytic (`calm flops`); generation "
            "tokens/s is greedy, batch 1, KV cache, median of 3 (`generation_speed.json`).",
            "",
        ]
    lines += _precision_lines(run)

    lines += _diagnostics_lines(metrics["calm"], evals.get("calm"))
    for name in plots:
        lines += [f"![{name}]({name})", ""]
    if not plots:
        lines += ["(plots skipped: install the optional extra `calm-lm[plot]` for matplotlib)", ""]
    samples = _read_json(run / "samples.json")
    if samples:
        lines += ["## Generations", ""]
        for s in samples:
            lines += [
                f"**T = {s['temperature']:g}**, prompt `{s['prompt']}`",
                "",
                f"- CALM: {_md_text(s['prompt'])} → {_md_text(s['calm'])}",
                f"- GPT: {_md_text(s['prompt'])} → {_md_text(s['gpt'])}",
                "",
            ]
    lines += _prompt_following_lines(_read_json(run / "prompt_following.json"))
    path = run / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path
