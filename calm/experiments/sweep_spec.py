"""The sweep spec: what ``calm sweep`` reads (a YAML file and/or the command line) and checks.

Spec format (YAML; every key but ``data`` and ``groups`` is optional)::

    data: runs/demo/data                # prepared data directory (`calm prepare`)
    autoencoder: runs/demo/autoencoder  # frozen autoencoder for CALM groups (run or checkpoint dir)
    budget: {flops: 3.0e13}             # or {tokens: 1.6e6}: per run; a group may set its own
    evals: 5                            # validation evaluations per run (sets eval_every, save_every)
    metrics: [brier1, cond_gap, gap_closed, energy_loss]   # columns and plot panels
    groups:
      - kind: calm                      # autoencoder | calm | gpt
        name: heads                     # run folders are NAME-KEY=VALUE-...; default: the kind
        preset: tiny                    # default: tiny
        set: {train.precision: fp32}    # overrides shared by the group's runs
        grid:                           # the cartesian product of these lists
          model.num_head_blocks: [1, 2, 4]
      - kind: gpt
        grid: {train.lr: [3.0e-4, 1.0e-3, 3.0e-3]}
      - kind: autoencoder
        name: ae
        budget: {tokens: 2.0e6}
        grid: {model.latent_dropout: [0.0, 0.15]}
      - kind: calm
        name: on-ae
        autoencoder: "@ae"              # one CALM run per run of the earlier group `ae`

Override keys are those of ``--set`` (``model.KEY`` / ``train.KEY``). ``train.max_steps`` is what the
budget sets, so it may not be overridden. A CALM run on an autoencoder run whose grid sets
``train.seed`` trains with that seed unless its own group sets one (seed s of an autoencoder study
is one replicate: the autoencoder and the CALM on it). Named ablation studies (``calm sweep --study
NAME``) build their specs in ``calm.experiments.studies``. Metric names are keys of the validation records in each
run's ``metrics.jsonl``; ``train/KEY`` reads the training records instead (e.g. ``train/loss``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from calm.config import ConfigError, parse_override

KINDS = ("autoencoder", "calm", "gpt")
DEFAULT_METRICS = [
    "brier1",
    "brierlm",
    "energy_loss",
    "flow_loss",
    "diffusion_loss",
    "cond_gap",
    "gap_closed",
    "ce",
    "token_accuracy",
]
"""Columns a results table offers; each run fills those its records hold (a CALM run logs its head's loss)."""
"""Columns when the spec names none; a run that does not log one leaves its cell empty."""


@dataclass
class Budget:
    """Training budget of one run: exactly one of ``flops`` (training FLOPs) or ``tokens``."""

    flops: float | None = None
    tokens: float | None = None

    def __post_init__(self) -> None:
        if (self.flops is None) == (self.tokens is None):
            raise ConfigError(f"a budget needs exactly one of flops or tokens, got {self.describe()}")
        value = self.flops if self.flops is not None else self.tokens
        if not isinstance(value, int | float) or isinstance(value, bool) or not value > 0:
            raise ConfigError(f"budget must be a positive number, got {self.describe()}")

    def describe(self) -> str:
        return f"flops={self.flops:.3g}" if self.flops is not None else f"tokens={self.tokens}"

    def max_steps(self, flops_per_token: float, batch_tokens: int) -> int:
        """Optimizer steps that fit the budget (rounded down, as ``calm.experiments.demo.steps_for_budget`` for the
        demo): budget / (batch_tokens · FLOPs per token); 0 when not even one step fits."""
        if self.flops is not None:
            return int(self.flops // (flops_per_token * batch_tokens))
        return int(self.tokens // batch_tokens)


@dataclass
class Group:
    """One stage's grid: every combination of ``grid`` values on top of ``preset`` and ``set``."""

    kind: str
    name: str = ""
    preset: str = "tiny"
    set: dict[str, Any] = field(default_factory=dict)
    grid: dict[str, list[Any]] = field(default_factory=dict)
    budget: Budget | None = None
    autoencoder: str | None = None
    """CALM only: a run/checkpoint directory, or ``@GROUP`` for each run of an earlier autoencoder group."""


@dataclass
class SweepSpec:
    """A whole sweep; build it in Python or read it with :func:`load_sweep` (module docstring)."""

    data: str
    groups: list[Group]
    budget: Budget | None = None
    autoencoder: str | None = None
    evals: int | None = 5
    metrics: list[str] = field(default_factory=lambda: list(DEFAULT_METRICS))


# ----------------------------------------------------------------------------- reading a spec

_TOP_KEYS = {"data", "groups", "budget", "autoencoder", "evals", "metrics"}
_GROUP_KEYS = {"kind", "name", "preset", "set", "grid", "budget", "autoencoder"}


def _budget(value: Any, where: str) -> Budget | None:
    if value is None:
        return None
    if not isinstance(value, dict) or not set(value) <= {"flops", "tokens"}:
        raise ConfigError(f"{where}: budget must be a mapping with one of 'flops' or 'tokens', got {value!r}")
    values = {k: float(v) if isinstance(v, str) else v for k, v in value.items()}
    try:
        return Budget(**values)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {e}") from e


def _overrides(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a mapping of KEY: VALUE overrides, e.g. {{train.lr: 1.0e-3}}")
    out = {}
    for key, v in value.items():
        out[str(key)] = parse_override(f"{key}={v}")[1] if isinstance(v, str) else v
    return out


def _group(raw: Any, index: int) -> Group:
    where = f"groups[{index}]"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where} must be a mapping with at least 'kind'")
    unknown = sorted(set(raw) - _GROUP_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {unknown}; known keys are {sorted(_GROUP_KEYS)}")
    kind = raw.get("kind")
    if kind not in KINDS:
        raise ConfigError(f"{where}: kind must be one of {list(KINDS)}, got {kind!r}")
    grid = raw.get("grid") or {}
    if not isinstance(grid, dict):
        raise ConfigError(f"{where}.grid must map override keys to lists of values")
    for key, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{where}.grid.{key} must be a non-empty list of values, got {values!r}")
    grid = {str(k): [_overrides({k: v}, where)[str(k)] for v in vs] for k, vs in grid.items()}
    name = str(raw.get("name") or kind)
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
        raise ConfigError(f"{where}: name {name!r} may only use letters, digits and _ . + - (it names folders)")
    return Group(
        kind=kind,
        name=name,
        preset=str(raw.get("preset", "tiny")),
        set=_overrides(raw.get("set"), f"{where}.set"),
        grid=grid,
        budget=_budget(raw.get("budget"), where),
        autoencoder=raw.get("autoencoder"),
    )


def sweep_from_dict(raw: Any) -> SweepSpec:
    """Validate a parsed spec (module docstring) and build a :class:`SweepSpec`; ConfigError names the fault."""
    if not isinstance(raw, dict):
        raise ConfigError("a sweep spec must be a YAML mapping with at least 'data' and 'groups'")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"unknown sweep keys {unknown}; known keys are {sorted(_TOP_KEYS)}")
    if not raw.get("data"):
        raise ConfigError("the sweep spec needs 'data': a prepared data directory (`calm prepare --out DIR`)")
    groups = raw.get("groups")
    if not isinstance(groups, list) or not groups:
        raise ConfigError("the sweep spec needs 'groups': a non-empty list of {kind, preset, set, grid} mappings")
    metrics = raw.get("metrics", DEFAULT_METRICS)
    if isinstance(metrics, str):
        metrics = [m.strip() for m in metrics.split(",") if m.strip()]
    if not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) for m in metrics):
        raise ConfigError(f"metrics must be a non-empty list of metric names, got {metrics!r}")
    evals = raw.get("evals", 5)
    if evals is not None and (not isinstance(evals, int) or isinstance(evals, bool) or evals < 1):
        raise ConfigError(f"evals must be a positive integer (evaluations per run) or null, got {evals!r}")
    parsed = [_group(g, i) for i, g in enumerate(groups)]
    names = [g.name for g in parsed]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"two groups are named {name!r}; give each group its own 'name'")
    return SweepSpec(
        data=str(raw["data"]),
        groups=parsed,
        budget=_budget(raw.get("budget"), "budget"),
        autoencoder=raw.get("autoencoder"),
        evals=evals,
        metrics=metrics,
    )


def _read_yaml(path: str | Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"sweep spec {path} does not exist")
    try:
        return yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from e


def load_sweep(path: str | Path) -> SweepSpec:
    """Read a YAML sweep spec; relative paths in it are relative to the current directory."""
    try:
        return sweep_from_dict(_read_yaml(path))
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from e


def parse_grid_arg(text: str) -> tuple[str, list[Any]]:
    """``KEY=V1,V2,...`` (or ``KEY=[V1, V2]``) -> (KEY, [values read as YAML])."""
    key, value = parse_override(text)
    if isinstance(value, list):
        return key, value
    items = text.split("=", 1)[1].split(",")
    if not all(item.strip() for item in items):
        raise ConfigError(f"--grid {text!r} must look like KEY=V1,V2,... with no empty value")
    return key, [parse_override(f"{key}={item.strip()}")[1] for item in items]


def spec_from_cli(
    spec_path: str | None = None,
    *,
    data: str | None = None,
    autoencoder: str | None = None,
    kind: str | None = None,
    name: str | None = None,
    preset: str | None = None,
    grid: list[str] | None = None,
    sets: list[str] | None = None,
    budget_flops: float | None = None,
    budget_tokens: float | None = None,
    evals: int | None = None,
    metrics: str | None = None,
) -> SweepSpec:
    """A spec from an optional YAML file plus ``calm sweep`` arguments.

    ``data``, ``autoencoder``, the budget, ``evals`` and ``metrics`` replace the file's values;
    ``kind`` with ``grid`` (``KEY=V1,V2``), ``sets`` (``KEY=VALUE``), ``preset`` and ``name`` adds one group.
    """
    raw = dict(_read_yaml(spec_path) or {}) if spec_path else {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{spec_path}: a sweep spec must be a YAML mapping")
    for key, value in (("data", data), ("autoencoder", autoencoder), ("evals", evals), ("metrics", metrics)):
        if value is not None:
            raw[key] = value
    if budget_flops is not None or budget_tokens is not None:
        raw["budget"] = {k: v for k, v in (("flops", budget_flops), ("tokens", budget_tokens)) if v is not None}
    if grid or sets or name or preset:
        if kind is None:
            raise ConfigError("--grid, --set, --name and --preset describe a group: add --kind autoencoder|calm|gpt")
    if kind is not None:
        group: dict[str, Any] = {"kind": kind, "grid": dict(parse_grid_arg(g) for g in grid or [])}
        group["set"] = dict(parse_override(t) for t in sets or [])
        group.update({k: v for k, v in (("name", name), ("preset", preset)) if v})
        raw["groups"] = list(raw.get("groups") or []) + [group]
    try:
        return sweep_from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"{spec_path}: {e}" if spec_path else str(e)) from e
