"""The results of a sweep (``calm.experiments.sweep``): a table and a plot of chosen metrics against training FLOPs.

Reads each run's ``metrics.jsonl`` (validation records, or training records for ``train/KEY``
metrics) and ``DONE.json``; the x axis is training FLOPs = tokens seen × the run's analytic
training FLOPs per token (``calm.models.flops``, paper Table 1's accounting), the same for every stage. Writes
``results.md`` (markdown table), ``results.csv``, ``results.json`` (rows plus every curve) and
``results.png`` (one panel per metric, one line per run; matplotlib, the ``plot`` extra).

Runs that differ only in ``train.seed`` (and in the seed-matched autoencoder they train on) are
replicates: :func:`summarise` gives their mean, standard deviation and range per metric, written as
a second table, so that a difference between settings can be read against run-to-run noise. CALM
rows also carry the head's analytic inference cost per sample (``calm.models.flops``; the paper's
head ablation, Figs. 8-9).
"""

from __future__ import annotations

import csv
import io
import statistics
from pathlib import Path
from typing import Any

from calm.experiments.report_plots import save_figure
from calm.io import atomic_write_text, read_json, read_jsonl, write_json

TRAIN_PREFIX = "train/"
SEED_KEYS = ("grid:train.seed", "grid:autoencoder")
"""Row keys that tell replicates apart rather than settings (the seed, and the autoencoder run it picks)."""


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The JSON records of ``run_dir/metrics.jsonl`` ([] if it does not exist). A last line cut short (a run
    stopped, or still running) is skipped with a warning; a damaged line before it raises
    ``calm.io.JSONFileError`` naming ``file:line`` (``calm.io.read_jsonl``)."""
    path = run_dir / "metrics.jsonl"
    return read_jsonl(path) if path.exists() else []


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
        done = read_json(run_dir / "DONE.json") if (run_dir / "DONE.json").exists() else None
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
                **getattr(run, "costs", {}),
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


def setting_key(row: dict[str, Any]) -> tuple[Any, ...]:
    """What a row's run is a replicate of: its group and grid values other than the seed."""
    grid = tuple((k, str(v)) for k, v in row.items() if k.startswith("grid:") and k not in SEED_KEYS)
    return (row["group"], *grid)


def summarise(rows: list[dict[str, Any]], metrics: list[str]) -> list[dict[str, Any]]:
    """One row per setting with several seeds: ``n``, and per metric its mean, ``_sd`` (sample standard
    deviation, None with one value) and ``_min`` / ``_max`` over the seeds that logged it. Settings
    with one run (e.g. a shared autoencoder) are left out; [] when no setting has more than one."""
    settings: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
    for row in rows:
        settings.setdefault(setting_key(row), []).append(row)
    if all(len(members) == 1 for members in settings.values()):
        return []
    summary = []
    for members in (m for m in settings.values() if len(m) > 1):  # a single run is in the main table
        first = members[0]
        entry = {"group": first["group"], "kind": first["kind"], "n": len(members)}
        entry.update({k: v for k, v in first.items() if k.startswith("grid:") and k not in SEED_KEYS})
        for metric in metrics:
            values = [m[metric] for m in members if m.get(metric) is not None]
            entry[metric] = statistics.fmean(values) if values else None
            entry[f"{metric}_sd"] = statistics.stdev(values) if len(values) > 1 else None
            entry[f"{metric}_min"] = min(values) if values else None
            entry[f"{metric}_max"] = max(values) if values else None
        summary.append(entry)
    return summary


def _summary_md(summary: list[dict[str, Any]], metrics: list[str]) -> list[str]:
    """Markdown: mean ± sd [min, max] per metric and setting."""
    grid = list(dict.fromkeys(k for e in summary for k in e if k.startswith("grid:")))
    shown = [m for m in metrics if any(e[m] is not None for e in summary)]
    lines = [
        "",
        "## Mean over seeds",
        "",
        "mean ± sample standard deviation [min, max] over the runs that differ only in `train.seed`.",
        "",
        "| " + " | ".join(["group", "kind"] + [g.removeprefix("grid:") for g in grid] + ["n"] + shown) + " |",
        "|" + "---|" * (3 + len(grid) + len(shown)),
    ]
    for e in summary:
        cells = [e["group"], e["kind"]] + [_cell(e.get(g)) for g in grid] + [str(e["n"])]
        for m in shown:
            mean, sd, lo, hi = (e[m + s] for s in ("", "_sd", "_min", "_max"))
            cells.append("" if mean is None else f"{mean:.4g} ± {_cell(sd) or 'n/a'} [{lo:.4g}, {hi:.4g}]")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_results(out: Path, runs: list[Any], metrics: list[str], title: str | None = None) -> list[dict[str, Any]]:
    """Write results.{md,csv,json,png} under ``out`` for the planned ``runs``; return the rows.

    ``title`` heads results.md (default: "Sweep results"); with replicate seeds a second table gives
    each setting's mean and spread (:func:`summarise`)."""
    rows = collect(out, runs, metrics)
    summary = summarise(rows, metrics)
    keys = list(dict.fromkeys(k for r in rows for k in r))
    grid = [k for k in keys if k.startswith("grid:")]
    columns = ["run", "group", "kind"] + grid + [k for k in keys[3:] if k not in grid and k != "curves"]
    columns = columns[:3] + [c for c in columns[3:] if any(_cell(r.get(c)) for r in rows)]  # none empty throughout
    table = [columns] + [[_cell(r.get(c)) for c in columns] for r in rows]
    md = ["| " + " | ".join(c.removeprefix("grid:") for c in columns) + " |", "|" + "---|" * len(columns)]
    md += ["| " + " | ".join(line) + " |" for line in table[1:]]
    budgets = sorted({run.budget for run in runs})
    header = [
        f"# {title or 'Sweep results'} ({len(runs)} runs; budget per run: {', '.join(budgets)})",
        "",
        "Metrics are the last validation value of each run (`train/KEY`: last training record); training "
        "FLOPs = tokens seen × analytic training FLOPs per token (`calm flops`). Curves: `results.png`.",
        "",
    ]
    md += _summary_md(summary, metrics) if summary else []
    atomic_write_text(out / "results.md", "\n".join(header + md) + "\n")
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(table)
    atomic_write_text(out / "results.csv", buf.getvalue())
    write_json(out / "results.json", {"metrics": metrics, "runs": rows, "summary": summary})
    _plot(out / "results.png", rows, metrics)
    return rows


def _plot(path: Path, rows: list[dict[str, Any]], metrics: list[str]) -> bool:
    """Write :func:`results_figure` to ``path``; False (and no file) without matplotlib or data."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig = results_figure(rows, metrics)
    if fig is None:
        return False
    save_figure(fig, path, plt, dpi=100)
    return True


def results_figure(rows: list[dict[str, Any]], metrics: list[str]) -> Any:
    """One panel per metric that some run logged against training FLOPs, and, where the CALM runs'
    heads differ in cost, the first metric's last value against the head's FLOPs per sample (the
    heads' trade-off, paper Figs. 8-9). A matplotlib Figure, or None when no run logged a metric."""
    import matplotlib.pyplot as plt

    shown = [m for m in metrics if any(r["curves"][m] for r in rows)]
    if not shown:
        return None
    costed = [r for r in rows if r.get("head_flops_per_sample") and r.get(shown[0]) is not None]
    cost_panel = len({r["head_flops_per_sample"] for r in costed}) > 1
    panels = len(shown) + cost_panel
    cols = min(3, panels)
    nrows = -(-panels // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 4 * nrows), squeeze=False)
    settings = list(dict.fromkeys(setting_key(r) for r in rows))  # replicates share a colour
    for ax, metric in zip(axes.flat, shown):
        seen: dict[tuple[Any, ...], int] = {}
        for r in rows:
            curve, key = r["curves"][metric], setting_key(r)
            if curve:
                replicate = seen[key] = seen.get(key, -1) + 1
                style = ("-", "--", ":", "-.")[replicate % 4]
                color = f"C{settings.index(key) % 10}"
                xs, ys = [x for x, _ in curve], [y for _, y in curve]
                ax.plot(xs, ys, "o" + style, ms=3, color=color, label=r["run"])
        ax.set(xscale="log", xlabel="training FLOPs", ylabel=metric, title=metric)
        label_log_axis(ax.xaxis)
        ax.grid(alpha=0.3)
    if cost_panel:
        ax = axes.flat[len(shown)]
        for r in costed:
            color = f"C{settings.index(setting_key(r)) % 10}"
            ax.plot(r["head_flops_per_sample"], r[shown[0]], "o", color=color, label=r["run"])
        ax.set(
            xscale="log", xlabel="head FLOPs per sample (inference)", ylabel=shown[0], title=f"{shown[0]} vs head cost"
        )
        label_log_axis(ax.xaxis)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[panels:]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.tight_layout()
    return fig


def label_log_axis(axis: Any) -> None:
    """Tick labels on a log axis whatever its range. matplotlib labels only powers of ten there, and a
    sweep at one budget often spans a fraction of a decade, which left the axis with no label at all:
    under a decade, about four evenly spaced ticks; under two decades, 1, 2 and 5 times powers of ten;
    wider, matplotlib's default. Minor ticks stay unlabelled (they overlap on short ranges)."""
    from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

    low, high = axis.get_view_interval()
    if high / low < 10:
        axis.set_major_locator(MaxNLocator(nbins=4))
    elif high / low < 100:
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    if high / low < 100:
        axis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:.3g}"))
    axis.set_minor_formatter(NullFormatter())
