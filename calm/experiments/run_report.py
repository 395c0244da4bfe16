"""``calm report`` on one training run or on a sweep folder (the demo's report is ``calm.experiments.report``).

- **One training run** (a folder with ``run_config.json``, from ``calm train-ae``, ``train-calm`` or
  ``train-gpt``): :func:`write_run_report` writes ``report.md`` with what the run is (kind, model size,
  data), how far it got (steps, tokens, analytic training FLOPs, wall time, precision, finished or
  not, options changed on resume), its last validation metrics, any ``eval*.json`` scores kept in the
  folder (``calm eval --json``), and ``curves.png``: the training loss and each validation metric
  against tokens seen.
- **A sweep folder** (``sweep.yaml`` from ``calm sweep``): :func:`rebuild_sweep_results` rewrites
  ``results.{md,csv,json,png}`` from the runs' own records (``sweep_run.json``, ``metrics.jsonl``), so
  it works on a sweep still running, moved, or whose data folder is gone.

:func:`write_any_report` decides which from what the folder holds.
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml

from calm.config import AutoencoderConfig, config_from_dict
from calm.experiments.report import LM_NAMES, read_metrics, write_report
from calm.experiments.report_plots import save_figure
from calm.experiments.sweep import PLAN_FILE, PlannedRun
from calm.experiments.sweep_results import label_log_axis, write_results
from calm.io import atomic_write_text, read_json
from calm.models.flops import ae_flops, run_flops

KIND_NAMES = {"autoencoder": "autoencoder", "calm": "CALM", "gpt": "GPT (token-level baseline)"}
TRAIN_COMMANDS = {"autoencoder": "train-ae", "calm": "train-calm", "gpt": "train-gpt"}


def write_any_report(path: str | Path) -> Path:
    """Rebuild the report of ``path``: a demo folder, a sweep folder or one training run; return the file written.

    Raises FileNotFoundError naming the three kinds of folder when ``path`` is none of them.
    """
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"run directory {path} does not exist")
    if (path / "sweep.yaml").exists():
        return rebuild_sweep_results(path)
    if (path / "run_config.json").exists():
        return write_run_report(path)
    if (path / "autoencoder").is_dir() or any((path / name).is_dir() for name in LM_NAMES):
        return write_report(path)
    raise FileNotFoundError(
        f"{path} is not a run calm can report on: expected a training run (run_config.json, from calm "
        "train-ae/train-calm/train-gpt), a sweep folder (sweep.yaml, from calm sweep) or a demo folder "
        f"(autoencoder/ and {', '.join(f'{n}/' for n in LM_NAMES)} from calm demo)"
    )


# ----------------------------------------------------------------------------- a sweep folder


def rebuild_sweep_results(out: Path) -> Path:
    """Rewrite ``out/results.*`` from each run folder's plan (``sweep_run.json``) and metrics; return results.md.

    Runs come in the spec's group order, and in the order they were started within a group (the
    order the sweep planned them). A run not yet started is absent; one still training shows what it
    has logged. The title of an existing results.md is kept.
    """
    spec = yaml.safe_load((out / "sweep.yaml").read_text()) or {}
    groups = {g.get("name"): list(g.get("grid") or {}) for g in spec.get("groups", [])}
    known = {f.name for f in fields(PlannedRun)}
    found = []
    for plan_file in out.glob(f"*/{PLAN_FILE}"):
        record = read_json(plan_file)
        run = PlannedRun(**{k: v for k, v in record.items() if k in known})
        grid = groups.get(run.group, [])  # the spec's order of grid keys (older plan files sorted them)
        ranked = sorted(run.grid_values, key=lambda k: grid.index(k) if k in grid else len(grid))
        run.grid_values = {k: run.grid_values[k] for k in ranked}
        order = list(groups).index(run.group) if run.group in groups else len(groups)
        found.append((order, plan_file.stat().st_mtime_ns, run))
    if not found:
        raise FileNotFoundError(f"{out} has a sweep.yaml but no started run ({PLAN_FILE} in a run folder) to report")
    runs = [run for *_, run in sorted(found, key=lambda item: item[:2])]
    write_results(out, runs, spec.get("metrics") or ["brier1"], title=_previous_title(out / "results.md"))
    return out / "results.md"


def _previous_title(path: Path) -> str | None:
    if not path.exists():
        return None
    match = re.match(r"# (.*) \(\d+ runs; ", path.read_text().split("\n", 1)[0])
    return match.group(1) if match else None


# ----------------------------------------------------------------------------- one training run


def write_run_report(run_dir: Path) -> Path:
    """Write ``run_dir/report.md`` (and ``curves.png`` with matplotlib) for one training run; return its path."""
    config = read_json(run_dir / "run_config.json")
    kind = config.get("kind")
    if kind not in KIND_NAMES:
        raise ValueError(f"{run_dir / 'run_config.json'} has kind {kind!r}; expected one of {', '.join(KIND_NAMES)}")
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if r.get("split") == "train"]
    val = [r for r in records if r.get("split") == "val"]
    lines = [f"# Training run report: {KIND_NAMES[kind]}", "", f"Run directory: `{run_dir}`", ""]
    lines += _run_table(run_dir, config, train, val)
    lines += _changes_lines(config.get("train_changes") or [])
    lines += _metrics_lines("Last validation metrics", val[-1] if val else None, "validation")
    lines += _eval_lines(run_dir)
    if _curves_plot(run_dir / "curves.png", train, val):
        lines += ["![training curves](curves.png)", ""]
    elif records:
        lines += ["(plot skipped: install the optional extra `calm-lm[plot]` for matplotlib)", ""]
    path = run_dir / "report.md"
    atomic_write_text(path, "\n".join(lines) + "\n")
    return path


def _train_flops_per_token(config: dict[str, Any]) -> float | None:
    """Analytic training FLOPs per token of the run's model (``calm flops``), the autoencoder's training excluded."""
    if config["kind"] == "autoencoder":
        return ae_flops(config_from_dict(AutoencoderConfig, config["model"]))["train_flops_per_token"]
    flops = run_flops(config)
    return None if flops is None else flops["train_flops_per_token"]


def _run_table(run_dir: Path, config: dict[str, Any], train: list[dict], val: list[dict]) -> list[str]:
    last = (train + val)[-1] if train or val else {}
    step = max((r.get("step", 0) for r in train + val), default=0)
    tokens = max((r.get("tokens", 0) for r in train + val), default=0)
    train_cfg = config.get("train", {})
    per_token = _train_flops_per_token(config)
    done = (run_dir / "DONE.json").exists() or step >= train_cfg.get("max_steps", float("inf"))
    resume = f"run the `calm {TRAIN_COMMANDS[config['kind']]}` command that started it again, with `--resume`"
    rows = [
        ("model", f"{KIND_NAMES[config['kind']]}, " + ", ".join(_model_summary(config.get("model", {})))),
        ("data", _data_text(config)),
        ("steps", f"{step:,} of {_count(train_cfg.get('max_steps'))}" if step else "none logged yet"),
        ("tokens seen", _count(tokens)),
        ("batch", f"{_count(train_cfg.get('batch_tokens'))} tokens per optimizer step"),
        (
            "training FLOPs",
            "n/a" if per_token is None else f"{per_token * tokens:.3g} ({per_token:.3g} per token, analytic)",
        ),
        ("precision", f"{train_cfg.get('precision', '?')} (asked: {train_cfg.get('precision_requested', '?')})"),
        ("wall time", f"{last.get('elapsed_s', 0):.0f} s of training" if last else "n/a"),
        ("status", "finished" if done else f"not finished: {resume}"),
    ]
    return ["| | |", "|---|---|", *[f"| {k} | {v} |" for k, v in rows], ""]


def _data_text(config: dict[str, Any]) -> str:
    """The data line: a prepared folder, or for ``calm finetune`` the examples file and the base checkpoint."""
    finetune = config.get("finetune")
    if finetune:
        counts = finetune.get("counts", {})
        lora = f", LoRA rank {finetune['lora']['rank']}" if finetune.get("lora") else ""
        return (
            f"fine-tuned from `{finetune.get('base_checkpoint', '?')}` on `{finetune.get('data', '?')}` "
            f"({_count(counts.get('train_examples'))} examples, {_count(counts.get('val_examples'))} held out{lora})"
        )
    data = config.get("data", {})
    return f"`{data.get('data_dir', '?')}` ({_count(data.get('train_tokens'))} training tokens)"


def _model_summary(model: dict[str, Any]) -> list[str]:
    keys = ("chunk_size", "hidden_size", "num_layers", "num_encoder_layers", "num_decoder_layers", "latent_size")
    keys += ("vocab_size", "max_seq_len")
    return [f"{k} {model[k]}" for k in keys if k in model]


def _count(value: Any) -> str:
    return f"{value:,}" if isinstance(value, int) else "?"


def _changes_lines(changes: list[dict[str, Any]]) -> list[str]:
    if not changes:
        return []
    lines = [
        "## Options changed on resume (`--allow-changes`)",
        "",
        "| from step | option | from | to |",
        "|---|---|---|---|",
    ]
    lines += [f"| {c['step']} | {c['field']} | {c['from']} | {c['to']} |" for c in changes]
    return [*lines, ""]


_SKIP = {"step", "split", "tokens", "elapsed_s", "lr", "grad_norm", "tokens_per_s", "train_flops"}


def _metrics_lines(title: str, record: dict[str, Any] | None, what: str) -> list[str]:
    if record is None:
        return [f"## {title}", "", f"No {what} record yet.", ""]
    values = {k: v for k, v in record.items() if k not in _SKIP and isinstance(v, (int, float)) and v is not None}
    lines = [f"## {title} (step {record.get('step', '?')})", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.6g} |" for k, v in values.items()]
    return [*lines, ""]


def _eval_lines(run_dir: Path) -> list[str]:
    lines: list[str] = []
    for path in sorted(run_dir.glob("eval*.json")):
        result = read_json(path)
        if not isinstance(result, dict) or "brierlm" not in result:
            continue
        context = (result.get("context") or {}).get("description", "")
        title = f"Evaluation `{path.name}`: {Path(str(result.get('data', '?'))).name}, {context}".rstrip(", ")
        scores = {
            k: result[k] for k in ("brierlm", "brier1", "brier2", "brier3", "brier4", "perplexity") if k in result
        }
        lines += _metrics_lines(title, {**scores, "positions": result.get("positions")}, "evaluation")
    return lines


def _curves_plot(path: Path, train: list[dict[str, Any]], val: list[dict[str, Any]]) -> bool:
    """Training loss and each validation metric against tokens seen; False without matplotlib or records."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    val_keys = [k for k in dict.fromkeys(k for r in val for k in r) if k not in _SKIP]
    panels = [("train loss", train, "loss")] * any("loss" in r for r in train)
    panels += [(f"val {k}", val, k) for k in val_keys if sum(k in r for r in val) >= 1][:5]
    if not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.5), squeeze=False)
    for ax, (title, rows, key) in zip(axes.flat, panels):
        points = [(r["tokens"], r[key]) for r in rows if r.get(key) is not None and r.get("tokens")]
        ax.plot([x for x, _ in points], [y for _, y in points], "o-", ms=3)
        ax.set(xscale="log", xlabel="tokens seen", title=title)
        label_log_axis(ax.xaxis)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, path, plt, dpi=100)
    return True
