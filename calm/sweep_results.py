"""The results of a sweep (``calm.sweep``): a table and a plot of chosen metrics against training FLOPs.

Reads each run's ``metrics.jsonl`` (validation records, or training records for ``train/KEY``
metrics) and ``DONE.json``; the x axis is training FLOPs = tokens seen × the run's analytic
training FLOPs per token (``calm.flops``, CALM-SPEC §7), the same for every stage. Writes
``results.md`` (markdown table), ``results.csv``, ``results.json`` (rows plus every curve) and
``results.png`` (one panel per metric, one line per run; matplotlib, the ``plot`` extra).
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

from calm.checkpoint import atomic_write_text
from calm.jsonio import to_json

TRAIN_PREFIX = "train/"


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The JSON records of ``run_dir/metrics.jsonl`` ([] if it does not exist; torn lines skipped)."""
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def metric_curve(records: list[dict[str, Any]], metric: str, flops_per_token: float) -> list[tuple[float, float]]:
    """[(training FLOPs, value)] of one metric over a run's records, in logging order."""
    split, key = ("train", metric[len(TRAIN_PREFIX) :]) if metric.startswith(TRAIN_PREFIX) else ("val", metric)
    return [
        (flops_per_token * r["tokens"], float(r[key]))
        for r in records
        if r.get("split") == split and key in r and isinstance(r[key], int | float) and "tokens" in r
    ]


def collect(out: Path, runs: list[Any], metrics: list[str]) -> list[dict[str, Any]]:
    """One row per planned run: its grid values, steps, tokens, FLOPs, status and the last value of
    each metric, plus ``curves`` {metric: [(FLOPs, value)]}."""
    rows = []
    for run in runs:
        run_dir = out / run.name
        records = read_records(run_dir)
        done = json.loads((run_dir / "DONE.json").read_text()) if (run_dir / "DONE.json").exists() else None
        train = [r for r in records if r.get("split") == "train" and "tokens" in r]
        tokens = train[-1]["tokens"] if train else 0
        curves = {m: metric_curve(records, m, run.flops_per_token) for m in metrics}
        rows.append(
            {
                "run": run.name,
                "group": run.group,
                "kind": run.kind,
                **{f"grid:{k}": v for k, v in run.grid_values.items()},
                "steps": train[-1]["step"] if train else 0,
                "max_steps": run.max_steps,
                "tokens": tokens,
                "train_flops": run.flops_per_token * tokens,
                "wall_min": round(train[-1]["elapsed_s"] / 60, 2) if train else None,
                "status": done["status"] if done else ("running" if records else "not started"),
                **{m: (c[-1][1] if c else None) for m, c in curves.items()},
                "curves": curves,
            }
        )
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def write_results(out: Path, runs: list[Any], metrics: list[str]) -> list[dict[str, Any]]:
    """Write results.{md,csv,json,png} under ``out`` for the planned ``runs``; return the rows."""
    rows = collect(out, runs, metrics)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    grid = [k for k in keys if k.startswith("grid:")]
    columns = ["run", "group", "kind"] + grid + [k for k in keys[3:] if k not in grid and k != "curves"]
    table = [columns] + [[_cell(r.get(c)) for c in columns] for r in rows]
    md = ["| " + " | ".join(c.removeprefix("grid:") for c in columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(line) + " |" for line in table[1:]]
    budgets = sorted({run.budget for run in runs})
    header = [
        f"# Sweep results ({len(runs)} runs; budget per run: {', '.join(budgets)})",
        "",
        "Metrics are the last validation value of each run (`train/KEY`: last training record); training "
        "FLOPs = tokens seen × analytic training FLOPs per token (`calm flops`). Curves: `results.png`.",
        "",
    ]
    atomic_write_text(out / "results.md", "\n".join(header + md) + "\n")
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(table)
    atomic_write_text(out / "results.csv", buf.getvalue())
    atomic_write_text(out / "results.json", to_json({"metrics": metrics, "runs": rows}, indent=2) + "\n")
    _plot(out / "results.png", rows, metrics)
    return rows


def _plot(path: Path, rows: list[dict[str, Any]], metrics: list[str]) -> bool:
    """One panel per metric that some run logged; False (and no file) without matplotlib or data."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    shown = [m for m in metrics if any(r["curves"][m] for r in rows)]
    if not shown:
        return False
    cols = min(3, len(shown))
    nrows = -(-len(shown) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 4 * nrows), squeeze=False)
    for ax, metric in zip(axes.flat, shown):
        for r in rows:
            curve = r["curves"][metric]
            if curve:
                ax.plot([x for x, _ in curve], [y for _, y in curve], "o-", ms=3, label=r["run"])
        ax.set(xscale="log", xlabel="training FLOPs", ylabel=metric, title=metric)
        ax.xaxis.set_minor_formatter(plt.NullFormatter())  # minor log ticks overlap on short ranges
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return True
