"""Experiment runner: a grid of ``--set`` overrides for one or several stages at a fixed training budget.

``calm sweep SPEC.yaml --out DIR`` (or :func:`run_sweep` from Python) expands a grid of overrides into
training runs of the autoencoder, CALM and/or GPT stages, gives every run the same budget in
training FLOPs (or tokens) by deriving its ``max_steps`` from its analytic ``flops_per_token``
(``calm.models.flops``, paper Table 1's accounting) and ``batch_tokens``, trains each in its own folder with the
ordinary loop (``calm.train.loop``), and writes a table (``results.md``, ``results.csv``,
``results.json``) and a plot (``results.png``) of the chosen validation metrics against training
FLOPs. Comparing at equal training compute is how the paper compares CALM with Transformers
(Table 1). Runs are resumable: a rerun skips finished runs (``DONE.json``) and resumes unfinished
ones from their newest checkpoint, so a sweep can be interrupted and restarted at will.

The spec format and its checks: :mod:`calm.experiments.sweep_spec`.
"""

from __future__ import annotations

import itertools
import json
import math
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml

from calm.checkpoint import read_config
from calm.config import AutoencoderConfig, ConfigError, Preset, config_from_dict, load_preset
from calm.experiments.sweep_results import write_results
from calm.experiments.sweep_spec import (  # noqa: F401 (public here too)
    DEFAULT_METRICS,
    KINDS,
    Budget,
    Group,
    SweepSpec,
    load_sweep,
    parse_grid_arg,
    spec_from_cli,
    sweep_from_dict,
)
from calm.io import atomic_write_text, read_json, to_json, write_json
from calm.models.flops import ae_flops, calm_flops, gpt_flops
from calm.train import loop as train_loop
from calm.train.stages import AutoencoderStage, CALMStage, GPTStage


@dataclass
class PlannedRun:
    """One training run of a sweep, with the steps its budget allows."""

    name: str
    group: str
    kind: str
    preset: str
    overrides: dict[str, Any]
    """Every override applied, the budget's ``train.max_steps`` included."""
    grid_values: dict[str, Any]
    autoencoder: str | None
    flops_per_token: float
    batch_tokens: int
    max_steps: int
    budget: str
    costs: dict[str, float] = field(default_factory=dict)
    """CALM runs: the head's inference cost (``head_passes_per_sample``, ``head_flops_per_sample`` =
    passes x 2 x head matmul weights) and ``inference_flops_per_token`` (``calm.models.flops``; Figs. 8-9)."""

    @property
    def train_flops(self) -> float:
        return self.flops_per_token * self.batch_tokens * self.max_steps


# ----------------------------------------------------------------------------- planning


def _value_text(value: Any) -> str:
    text = format(value, "g") if isinstance(value, float) else str(value)
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", text)


def _short_keys(keys: list[str]) -> dict[str, str]:
    """``model.num_head_blocks`` -> ``num_head_blocks`` unless two keys would then collide."""
    short = {k: k.partition(".")[2] or k for k in keys}
    counts = {s: list(short.values()).count(s) for s in short.values()}
    return {k: (s if counts[s] == 1 else k) for k, s in short.items()}


def _data_vocab_size(data: Path) -> int:
    meta = data / "meta.json"
    if not meta.exists():
        raise FileNotFoundError(f"{meta} is missing: 'data' must be a directory made by `calm prepare`")
    return int(read_json(meta)["vocab_size"])


def stage_flops_per_token(
    kind: str, preset: Any, vocab_size: int, ae_config: AutoencoderConfig | None
) -> tuple[float, dict[str, float]]:
    """The stage's analytic training FLOPs per token (the same call the stage makes) and, for CALM,
    the head's inference cost (:attr:`PlannedRun.costs`).

    Computed on the model config the stage would build (``vocab_size`` from the data and, for CALM,
    K and the latent size from ``ae_config``); ``preset`` itself is not changed."""
    model, train = replace(preset.model, vocab_size=vocab_size), preset.train
    if kind == "autoencoder":
        model.validate()
        return float(ae_flops(model)["train_flops_per_token"]), {}
    if kind == "gpt":
        if train.block_size - 1 > model.max_seq_len:
            raise ConfigError(f"block_size={train.block_size} exceeds max_seq_len={model.max_seq_len} + 1")
        model.validate()
        return float(gpt_flops(model, context=train.block_size)["train_flops_per_token"]), {}
    model = replace(model, chunk_size=ae_config.chunk_size, latent_size=ae_config.latent_size)
    if train.block_size % model.chunk_size or train.block_size // model.chunk_size - 1 > model.max_seq_len:
        raise ConfigError(
            f"block_size={train.block_size} must be a multiple of K={model.chunk_size} with at most "
            f"max_seq_len={model.max_seq_len} + 1 chunks"
        )
    model.validate()
    counts = calm_flops(model, ae_config, context=train.block_size // model.chunk_size)
    costs = {
        "head_passes_per_sample": counts["head_passes_per_sample"],
        "head_flops_per_sample": counts["breakdown"]["inference_per_step"]["head"],
        "inference_flops_per_token": counts["inference_flops_per_token"],
    }
    return float(counts["train_flops_per_token"]), costs


def _autoencoder_config(path: str) -> AutoencoderConfig:
    config = read_config(path)
    if config["kind"] != "autoencoder":
        raise ConfigError(f"{path} is a {config['kind']} checkpoint; CALM groups need an autoencoder")
    return config_from_dict(AutoencoderConfig, config["model"])


def _group_autoencoders(
    group: Group,
    spec: SweepSpec,
    out: Path,
    by_group: dict[str, list[PlannedRun]],
    ae_configs: dict[str, AutoencoderConfig],
) -> list[tuple[str | None, str | None]]:
    """[(autoencoder path, autoencoder run name or None)] a group trains on; [(None, None)] if not CALM.

    Records the config of a given autoencoder checkpoint in ``ae_configs`` (keyed by its path).
    """
    where = f"group {group.name!r}"
    source = group.autoencoder or spec.autoencoder
    if group.kind != "calm":
        if group.autoencoder:
            raise ConfigError(f"{where}: only calm groups take an 'autoencoder'")
        return [(None, None)]
    if not source:
        raise ConfigError(f"{where} trains CALM: set 'autoencoder' (a run directory or @GROUP)")
    if source.startswith("@"):
        ae_runs = by_group.get(source[1:])
        if not ae_runs or ae_runs[0].kind != "autoencoder":
            raise ConfigError(f"{where}: autoencoder {source!r} must name an earlier autoencoder group")
        return [(str((out / r.name).resolve()), r.name) for r in ae_runs]
    source = str(Path(source).resolve())
    ae_configs[source] = _autoencoder_config(source)
    return [(source, None)]


def plan_sweep(spec: SweepSpec, out: str | Path, *, vocab_size: int | None = None) -> list[PlannedRun]:
    """Expand every group into runs and derive each run's ``max_steps`` from its budget.

    Everything that can be checked without training is checked here (override keys, presets,
    budgets, autoencoders, name clashes), so a bad spec fails before any run starts.
    ``vocab_size`` plans for data not prepared yet (default: the data's ``meta.json``).
    """
    out, vocab = Path(out), vocab_size or _data_vocab_size(Path(spec.data))
    runs: list[PlannedRun] = []
    by_group: dict[str, list[PlannedRun]] = {}
    ae_configs: dict[str, AutoencoderConfig] = {}
    for group in spec.groups:
        where = f"group {group.name!r}"
        budget = group.budget or spec.budget
        if budget is None:
            raise ConfigError(f"{where} has no budget: set 'budget' at the top of the spec or in the group")
        if "train.max_steps" in group.set or "train.max_steps" in group.grid:
            raise ConfigError(f"{where}: train.max_steps is derived from the budget; set the budget instead")
        autoencoders = _group_autoencoders(group, spec, out, by_group, ae_configs)
        short = _short_keys(list(group.grid))
        points = list(itertools.product(*group.grid.values()))
        group_runs = []
        for (ae_path, ae_run), values in itertools.product(autoencoders, points):
            grid_values = dict(zip(group.grid, values))
            parts = [group.name] + [f"{short[k]}={_value_text(v)}" for k, v in grid_values.items()]
            parts += [f"ae={ae_run}"] if ae_run else []
            name = "-".join(parts)
            overrides = {**group.set, **grid_values}
            ae_seed = _chained_seed(ae_run, by_group)
            if ae_seed is not None and "train.seed" not in overrides:
                overrides["train.seed"] = ae_seed
            try:
                preset = load_preset(group.kind, group.preset, overrides)
                preset.train.validate()
                fpt, costs = stage_flops_per_token(group.kind, preset, vocab, ae_configs.get(ae_run or ae_path or ""))
            except ConfigError as e:
                raise ConfigError(f"run {name}: {e}") from e
            steps = budget.max_steps(fpt, preset.train.batch_tokens)
            if steps < 1:
                raise ConfigError(
                    f"run {name}: the budget ({budget.describe()}) is less than one optimizer step "
                    f"({preset.train.batch_tokens} tokens x {fpt:.3g} FLOPs/token); raise it or lower batch_tokens"
                )
            overrides["train.max_steps"] = steps
            if spec.evals and "train.eval_every" not in overrides:
                overrides["train.eval_every"] = max(1, math.ceil(steps / spec.evals))
            if spec.evals and "train.save_every" not in overrides:
                overrides["train.save_every"] = overrides.get("train.eval_every", preset.train.eval_every)
            run = PlannedRun(
                name=name,
                group=group.name,
                kind=group.kind,
                preset=group.preset,
                overrides=overrides,
                grid_values=grid_values if not ae_run else {**grid_values, "autoencoder": ae_run},
                autoencoder=ae_path,
                flops_per_token=fpt,
                batch_tokens=preset.train.batch_tokens,
                max_steps=steps,
                budget=budget.describe(),
                costs=costs,
            )
            if group.kind == "autoencoder":  # as its stage will build it: the data's vocabulary
                ae_configs[name] = replace(preset.model, vocab_size=vocab)
            group_runs.append(run)
        by_group[group.name] = group_runs
        runs += group_runs
    names = [r.name for r in runs]
    clashes = sorted({n for n in names if names.count(n) > 1})
    if clashes:
        raise ConfigError(f"several runs would share the folders {clashes}; give the groups distinct names")
    return runs


def _chained_seed(ae_run: str | None, by_group: dict[str, list[PlannedRun]]) -> int | None:
    """The ``train.seed`` an autoencoder run's grid set (None if it set none or there is no such run)."""
    for runs in by_group.values():
        for run in runs:
            if run.name == ae_run and "train.seed" in run.grid_values:
                return int(run.grid_values["train.seed"])
    return None


# ----------------------------------------------------------------------------- running

PLAN_FILE, _DONE_FILE = "sweep_run.json", "DONE.json"


def _plan_record(run: PlannedRun, spec: SweepSpec) -> dict[str, Any]:
    return json.loads(to_json({**asdict(run), "data": str(Path(spec.data).resolve())}))


def _make_stage(run: PlannedRun, spec: SweepSpec, preset: Preset) -> train_loop.Stage:
    if run.kind == "autoencoder":
        return AutoencoderStage(spec.data, preset.model, preset.train)
    if run.kind == "calm":
        return CALMStage(spec.data, preset.model, preset.train, run.autoencoder)
    return GPTStage(spec.data, preset.model, preset.train)


def run_state(run: PlannedRun, spec: SweepSpec, out: str | Path) -> str:
    """``"new"``, ``"started"`` (it will resume) or ``"done"``; the real run and ``--dry-run`` both ask this.

    Raises:
        ConfigError: the folder holds a run of another plan (e.g. the budget or data changed).
    """
    run_dir = Path(out) / run.name
    if not (run_dir / PLAN_FILE).exists():
        return "new"
    previous, plan = read_json(run_dir / PLAN_FILE), _plan_record(run, spec)
    if previous != plan:
        changed = sorted(k for k in plan if previous.get(k) != plan[k])
        raise ConfigError(
            f"{run_dir} holds a run planned differently (changed: {changed}); delete the folder to retrain it "
            "or sweep into another --out"
        )
    return "done" if (run_dir / _DONE_FILE).exists() else "started"


def run_one(run: PlannedRun, spec: SweepSpec, out: str | Path, *, progress: bool = True) -> dict[str, Any]:
    """Train one planned run into ``out/run.name`` (resuming it if started); return its DONE record.

    A finished run (``DONE.json``) is not trained again. A run that stops on a non-finite loss is
    recorded as failed (a diverging setting is a result too); delete its folder to retry it.

    Raises:
        ConfigError: the folder holds a run of another plan (e.g. the budget or data changed).
    """
    run_dir = Path(out) / run.name
    plan, state = _plan_record(run, spec), run_state(run, spec, out)
    if state == "done":
        return read_json(run_dir / _DONE_FILE)
    if state == "new":  # written once: its age orders the runs for `calm report`
        run_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_dir / PLAN_FILE, plan)  # in plan order: `calm report` rebuilds the columns from it
    preset = load_preset(run.kind, run.preset, run.overrides)
    stage = _make_stage(run, spec, preset)
    if stage.flops_per_token is not None and not math.isclose(stage.flops_per_token, run.flops_per_token):
        raise RuntimeError(
            f"run {run.name}: the stage counts {stage.flops_per_token:.6g} FLOPs/token but the plan "
            f"{run.flops_per_token:.6g}; calm.experiments.sweep and calm.train.stages disagree (a bug)"
        )
    start = time.perf_counter()
    try:
        result, status = train_loop.run_training(stage, preset.train, run_dir, resume=True, progress=progress), "done"
    except train_loop.NonFiniteError as e:
        result, status = {}, f"failed: {e}"
    except train_loop.ResumeChangesError as e:  # a sweep has no --allow-changes: say what works here
        raise ConfigError(
            f"run {run.name} in {run_dir.parent} was started with other training options ({e.listed}); sweep "
            "with the spec it began with to finish it, or pass another --out to start afresh"
        ) from e
    record = {"status": status, "result": result, "wall_s": round(time.perf_counter() - start, 1), "plan": plan}
    write_json(run_dir / _DONE_FILE, record)
    return record


def run_sweep(
    spec: SweepSpec,
    out: str | Path,
    *,
    dry_run: bool = False,
    progress: bool = True,
    echo: Any = print,
    title: str | None = None,
    vocab_size: int | None = None,
) -> list[dict[str, Any]]:
    """Plan, train every run not yet finished (in spec order), then write the results; return the rows.

    ``dry_run`` plans and prints the runs without training or writing anything (``vocab_size``
    plans it for data not prepared yet); it refuses what the real run refuses (:func:`run_state`).
    Outputs in ``out``: one folder per run, ``results.{md,csv,json}`` and ``results.png``
    (:func:`write_results`, headed by ``title``).
    """
    runs = plan_sweep(spec, out, vocab_size=vocab_size)
    for run in runs:  # a folder planned differently is refused here, before anything is trained
        seed = "" if (seed := run.overrides.get("train.seed")) is None else f", seed {seed}"
        state = {"new": "", "started": " (started: resumes)", "done": " (done)"}[run_state(run, spec, out)]
        echo(
            f"{run.name}: {run.max_steps} steps x {run.batch_tokens} tokens = {run.train_flops:.3g} FLOPs{seed}{state}"
        )
    if dry_run:
        return []
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "sweep.yaml", yaml.safe_dump(_spec_record(spec), sort_keys=False))
    for i, run in enumerate(runs, 1):
        echo(f"\n=== sweep run {i}/{len(runs)}: {run.name} ===")
        record = run_one(run, spec, out, progress=progress)
        if record["status"] != "done":
            echo(f"{run.name}: {record['status']}")
    rows = write_results(out, runs, spec.metrics, title=title)
    echo(f"\nresults: {out / 'results.md'}")
    return rows


def _spec_record(spec: SweepSpec) -> dict[str, Any]:
    """The spec as plain data (YAML-safe), kept next to the results."""
    return json.loads(to_json(asdict(spec)))
