"""The run report's PNG plots (``calm report``): training curves, Brier against training FLOPs, head diagnostics.

The axes are the paper's (Table 1 / Fig. 5: quality against training compute and inference cost); the
head diagnostics are ours (``calm.eval.diagnostics``). matplotlib is an optional extra
(``calm-lm[plot]``): without it :func:`make_plots` draws nothing and says so by returning [].
Every plot is written atomically, so a crash leaves the previous file, never half of one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from calm.io import atomic_file, read_json

Records = list[dict[str, Any]]
MARKERS = ("o", "^", "s", "D", "v")


def make_plots(
    run: Path,
    rows: list[dict[str, Any]],
    metrics: dict[str, Records],
    names: dict[str, str],
    flops: dict[str, dict[str, Any] | None],
) -> list[str]:
    """Write the run's PNG plots; return their file names ([] without matplotlib).

    ``rows``: the report's summary rows (``model``, ``train_flops``, ``brierlm``, ...); ``metrics``: each
    run's metrics.jsonl records (``autoencoder`` and the language-model runs); ``names``: run -> name in
    the plots; ``flops``: run -> its analytic FLOPs (``calm.models.flops``) or None.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    lm = {run_name: metrics.get(run_name, []) for run_name in names}
    made = []
    _training_curves_plot(run, metrics.get("autoencoder", []), lm, names, plt)
    made.append("training_curves.png")
    _brierlm_vs_flops_plot(run, lm, rows, names, flops, plt)
    made.append("brierlm_vs_flops.png")
    if _brier_n_plot(run, lm, names, flops, plt):
        made.append("brier_n_vs_flops.png")
    calms = {k: v for k, v in lm.items() if (flops.get(k) or {}).get("kind") == "calm"}
    if _diagnostics_plot(run, calms, names, flops, plt):
        made.append("head_diagnostics.png")
    return made


def save_figure(fig: Any, path: Path, plt: Any, dpi: int = 110) -> None:
    """Write ``fig`` to ``path`` as a PNG, atomically (a crash leaves the previous plot, not half a file), and
    close it."""
    try:
        with atomic_file(path) as tmp:
            fig.savefig(tmp, dpi=dpi, format="png")
    finally:
        plt.close(fig)


def _val_series(records: Records, flops: dict[str, Any] | None, key: str) -> tuple[list[float], Records]:
    """(training FLOPs, records) of the validation records that have ``key``."""
    val = [r for r in records if r.get("split") == "val" and key in r]
    if not val or not flops:
        return [], []
    return [flops["train_flops_per_token"] * r["tokens"] for r in val], val


def _training_curves_plot(run: Path, ae: Records, lm: dict[str, Records], names: dict[str, str], plt: Any) -> None:
    """training_curves.png: the autoencoder's validation accuracy and each language model's training loss."""
    fig, axes = plt.subplots(1, 1 + len(lm), figsize=(5 * (1 + len(lm)), 4))
    val = [r for r in ae if r.get("split") == "val"]
    if val:
        minutes = [r["elapsed_s"] / 60 for r in val]
        axes[0].plot(minutes, [100 * r["token_accuracy"] for r in val], "o-", label="decode μ")
        axes[0].plot(minutes, [100 * r["token_accuracy_sampled"] for r in val], "s--", label="decode z~q")
        axes[0].set(xlabel="training minutes", ylabel="token accuracy (%)", title="Autoencoder reconstruction (val)")
        axes[0].legend()
    for (run_name, records), ax in zip(lm.items(), axes[1:]):
        cfg = _read_config(run / run_name)
        is_calm = cfg.get("kind") == "calm"
        key = f"{cfg.get('model', {}).get('head', 'energy')}_loss" if is_calm else "loss"  # the head's own
        train = [r for r in records if r.get("split") == "train" and key in r]
        if train:
            ax.plot([r["tokens"] / 1e6 for r in train], [r[key] for r in train])
            ax.set(xlabel="training tokens (M)", ylabel=key, title=f"{names[run_name]} training loss")
    fig.tight_layout()
    save_figure(fig, run / "training_curves.png", plt)


def _read_config(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "run_config.json"
    return read_json(path) if path.exists() else {}


def _brierlm_vs_flops_plot(
    run: Path,
    lm: dict[str, Records],
    rows: list[dict[str, Any]],
    names: dict[str, str],
    flops: dict[str, dict[str, Any] | None],
    plt: Any,
) -> None:
    """brierlm_vs_flops.png: Brier-1 and BrierLM against language-model training FLOPs (validation curves,
    test results), and the test Brier-1 against inference FLOPs per token."""
    fig, axes = plt.subplots(1, 3, figsize=(16, 4))
    for (run_name, records), marker in zip(lm.items(), MARKERS):
        x, val = _val_series(records, flops.get(run_name), "brier1")
        if val:
            label = f"{names[run_name]} (validation, own context)"
            axes[0].plot(x, [r["brier1"] for r in val], marker + "-", label=label)
            axes[2].plot(x, [r.get("brierlm", 0.0) for r in val], marker + "-", label=label)
    for row, marker in zip(rows, MARKERS):
        b1 = (row["brier_n"] or [None])[0]
        if b1 is not None and row["train_flops"]:
            axes[0].plot([row["train_flops"]], [b1], marker, ms=11, mfc="none", label=f"{row['model']} (test)")
            axes[1].errorbar(
                [row["inference_flops_per_token"]],
                [b1],
                yerr=[row["brier_se"][0] or 0],
                fmt=marker,
                ms=9,
                capsize=4,
                label=row["model"],
            )
    axes[0].set(xscale="log", xlabel="LM training FLOPs", ylabel="Brier-1 (%)", title="Brier-1 vs training compute")
    axes[2].set(xscale="log", xlabel="LM training FLOPs", ylabel="BrierLM", title="BrierLM vs training compute")
    axes[1].set(xlabel="inference FLOPs per token", ylabel="Brier-1 (%), test", title="Brier-1 vs inference cost")
    for ax in axes:
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, run / "brierlm_vs_flops.png", plt)


def _brier_n_plot(
    run: Path, lm: dict[str, Records], names: dict[str, str], flops: dict[str, dict[str, Any] | None], plt: Any
) -> bool:
    """Validation Brier-1..4 of every language model against training FLOPs (the paper compares at equal compute).
    The validation during training scores each model with its own training blocks (a CALM's are K times as many
    tokens as a token model's at the same steps): curves, not the equal-context comparison of the report's table."""
    series = {k: _val_series(records, flops.get(k), "brier1") for k, records in lm.items()}
    series = {k: v for k, v in series.items() if v[1]}
    if not series:
        return False
    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    for n, ax in enumerate(axes, start=1):
        for (run_name, (x, val)), marker in zip(series.items(), MARKERS):
            ax.plot(x, [r[f"brier{n}"] for r in val], marker + "-", label=names[run_name])
        ax.axhline(0.0, color="gray", lw=0.8)
        title = f"Brier-{n} (validation, own context)"
        ax.set(xscale="log", xlabel="LM training FLOPs", ylabel=f"Brier-{n} (%)", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    save_figure(fig, run / "brier_n_vs_flops.png", plt)
    return True


def _diagnostics_plot(
    run: Path, calms: dict[str, Records], names: dict[str, str], flops: dict[str, dict[str, Any] | None], plt: Any
) -> bool:
    """The CALMs' head diagnostics (``calm.eval.diagnostics``, ours) at each validation, against training FLOPs."""
    series = {k: _val_series(records, flops.get(k), "cond_gap") for k, records in calms.items()}
    series = {k: v for k, v in series.items() if v[1]}
    if not series:
        return False
    fig, axes = plt.subplots(1, 4, figsize=(21, 4))
    for (run_name, (x, val)), marker in zip(series.items(), MARKERS):
        name = names[run_name]
        gaps = [r["cond_gap"] for r in val]
        axes[0].errorbar(x, gaps, yerr=[r["cond_gap_se"] for r in val], fmt=marker + "-", capsize=3, label=name)
        axes[1].plot(x, [r["diag_energy_loss"] for r in val], marker + "-", label=f"{name}: own h")
        axes[1].plot(x, [r["diag_energy_loss_shuffled"] for r in val], marker + "--", label=f"{name}: shuffled h")
        axes[2].plot(x, [100 * r["first_token_acc_point"] for r in val], marker + "-", label=f"{name}: first token")
        axes[2].plot(x, [100 * r["chunk_acc_point"] for r in val], marker + ":", label=f"{name}: whole chunk")
        axes[3].plot(x, [100 * r["gap_closed"] for r in val], marker + "-", label=name)
    x, val = next(iter(series.values()))
    axes[1].plot(x, [r["marginal_distance"] for r in val], ":", color="gray", label="marginal (best context-free)")
    axes[1].plot(x, [r["noise_floor"] for r in val], "-.", color="gray", label="noise floor")
    axes[0].set(ylabel="energy score: own h − shuffled h", title="Conditioning gap (> 0: head uses context)")
    axes[1].set(ylabel="latent distance^α", title="Loss between its bounds")
    axes[2].set(ylabel="accuracy (%), mean of 32 samples", title="Teacher-forced next-chunk accuracy")
    axes[3].set(ylabel="% of (marginal − noise floor)", title="Achievable gap closed (0: best context-free)")
    for ax in axes:
        ax.set(xscale="log", xlabel="LM training FLOPs")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in (axes[0], axes[3]):
        ax.axhline(0.0, color="gray", lw=0.8)
    fig.tight_layout()
    save_figure(fig, run / "head_diagnostics.png", plt)
    return True
