"""The paper's ablations as named studies, one command each: ``calm sweep --study NAME --out DIR``.

Each study is a list of variants (a CALM setting, and for autoencoder studies the autoencoder it
trains on) that :func:`study_spec` turns into an ordinary sweep spec (``calm.experiments.sweep``): every CALM
run gets the same training-FLOPs budget, every autoencoder run the same autoencoder budget, and the
results are the sweep's table and plot of BrierLM, Brier-1..4, the conditioning gap and the heads'
cost against training FLOPs. The studies and the paper's results they revisit:

========================  ======================================================  ==================
study                     variants                                                paper
========================  ======================================================  ==================
``heads``                 energy | flow matching | diffusion head                 Figs. 8-9
``input``                 discrete | continuous | both                            Table 5
``energy-loss``           default N=8, M=100, α=1; then N=2, M=16, α=0.5, α=1.5   Tables 3-4
``ae-regularisers``       full recipe; KL off; plain KL; no DropToken; no DropLatent  Table 2
``latent-size``           l ∈ {32, 64, 128, 256}, dropouts 0.05·log2(l/16)          Fig. 7
``chunk-size``            K ∈ {1, 2, 4, 8} with l = 32·K                          Fig. 4
========================  ======================================================  ==================

The first three share one autoencoder (trained in the study folder as run ``ae``, or given with
``--autoencoder``); the last three train one autoencoder per variant and one CALM on each. The
energy-loss study varies one knob at a time from the default instead of the paper's full tables.
``--seeds N`` repeats every CALM run with seeds 1..N (in autoencoder studies, each seed trains its
own autoencoder and the CALM on it with the same seed), so the results show run-to-run noise.

Budgets are stated as optimizer steps of the default setting (energy head, discrete input, the
preset's autoencoder), converted to FLOPs with ``calm.models.flops``; a costlier variant gets fewer steps.
The tiny defaults are sized for one CPU thread
(docs/guides/experiments.md#the-papers-ablations-calm-sweep---study); ``--scale S`` (or M, L, XL)
uses that CALM preset, the ``paper`` autoencoder and the paper's ablation budgets (CALM 50k steps of
the preset's batch; autoencoder 30k steps).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from calm.config import ConfigError, latent_ablation_overrides, load_preset
from calm.experiments.demo import DEMO_VOCAB_SIZE, prepare_demo_data
from calm.experiments.sweep import SweepSpec, run_sweep, stage_flops_per_token, sweep_from_dict
from calm.io import read_json

DEFAULT_VOCAB_SIZE = DEMO_VOCAB_SIZE
"""The vocabulary of the default data (``calm demo``'s ``--vocab-size``): planning a study whose data is
not prepared yet assumes it."""
CALM_METRICS = ["brierlm", "brier1", "brier2", "brier3", "brier4", "cond_gap", "gap_closed"]
HEAD_LOSSES = ["energy_loss", "flow_loss", "diffusion_loss"]
AE_METRICS = ["token_accuracy", "chunk_exact_match"]


@dataclass(frozen=True)
class Variant:
    """One setting of a study: CALM overrides and, for autoencoder studies, the autoencoder's."""

    label: str
    """Names the variant's groups and run folders (letters, digits, ``_ . + -``)."""
    calm: dict[str, Any] = field(default_factory=dict)
    autoencoder: dict[str, Any] | None = None
    """None: the study's shared autoencoder."""


@dataclass(frozen=True)
class Scale:
    """Presets and budgets of a study: ``tiny`` (our default) or a paper preset (``--scale``)."""

    calm_preset: str
    ae_preset: str
    calm_steps: int
    """CALM budget, in optimizer steps of the default setting (energy head, discrete input)."""
    ae_steps: int
    """Autoencoder budget, in optimizer steps of the preset's autoencoder."""
    evals: int
    calm_set: dict[str, Any] = field(default_factory=dict)
    ae_set: dict[str, Any] = field(default_factory=dict)
    diffusion_set: dict[str, Any] = field(default_factory=dict)
    """Extra overrides of diffusion-head runs: 100 head passes per sample make their evaluation costly."""


TINY = Scale(
    calm_preset="tiny",
    ae_preset="tiny",
    calm_steps=400,
    ae_steps=500,
    evals=3,
    # half the tiny preset's batch: twice the optimizer steps for the same tokens at this small budget
    calm_set={"train.batch_tokens": 2048, "train.eval_tokens": 8192, "train.warmup_steps": 20},
    ae_set={"train.eval_tokens": 8192, "train.warmup_steps": 20},
    # one evaluation, at the end, on 4 blocks: the head diagnostics' 48 samples x 1024 positions x
    # 100 passes take ~2.5 min on one thread (measured), ten times the energy head's whole evaluation
    diffusion_set={"train.eval_tokens": 4096, "train.eval_every": 1_000_000},
)
"""Sized so that each study runs in about 12 minutes on one CPU thread (docs/research/ablations.md)."""
TINY_BUDGETS: dict[str, tuple[int, int, int]] = {
    "energy-loss": (300, 500, 2),
    "ae-regularisers": (250, 250, 2),
    "latent-size": (250, 250, 2),
    "chunk-size": (250, 250, 2),
}
"""Per study at the tiny scale: (CALM steps, autoencoder steps, evaluations per run) where they differ
from :data:`TINY`'s: studies with more runs get smaller budgets to stay near 12 minutes."""


def paper_scale(calm_preset: str) -> Scale:
    """The paper's ablation setting (S-size CALM, 50k steps) for a CALM preset."""
    return Scale(calm_preset=calm_preset, ae_preset="paper", calm_steps=50_000, ae_steps=30_000, evals=10)


def _heads() -> list[Variant]:
    return [Variant(head, {"model.head": head}) for head in ("energy", "flow", "diffusion")]


def _input() -> list[Variant]:
    return [Variant(kind, {"model.input": kind}) for kind in ("discrete", "continuous", "both")]


def _energy_loss() -> list[Variant]:
    """One knob at a time from the paper's default (N=8, M=100, α=1): Tables 3 and 4, reduced."""
    return [
        Variant("default"),
        Variant("N2", {"model.num_samples": 2}),
        # M = 16 (paper: 4.56), not the paper's M = 1: chosen when the head diagnostics refused M = 1 (they
        # now diagnose such a model with M = 2); kept so that the energy-loss table of
        # docs/research/ablations.md stays reproducible
        Variant("M16", {"model.num_target_samples": 16}),
        Variant("alpha0.5", {"model.energy_alpha": 0.5}),
        Variant("alpha1.5", {"model.energy_alpha": 1.5}),
    ]


def _ae_regularisers() -> list[Variant]:
    """The full recipe (clipped KL, DropToken, DropLatent) and each switch undone alone (Table 2)."""
    return [
        Variant("full", autoencoder={}),
        Variant("kl-off", autoencoder={"model.kl_mode": "off"}),
        Variant("kl-plain", autoencoder={"model.kl_mode": "plain"}),
        Variant("no-droptoken", autoencoder={"model.token_dropout": 0.0}),
        Variant("no-droplatent", autoencoder={"model.latent_dropout": 0.0}),
    ]


def _latent_size() -> list[Variant]:
    return [Variant(f"l{size}", autoencoder=latent_ablation_overrides(size)) for size in (32, 64, 128, 256)]


def _chunk_size(block_size: int) -> list[Variant]:
    """K ∈ {1, 2, 4, 8}, l = 32·K; the context stays ``block_size`` tokens (block_size / K steps)."""
    return [
        Variant(
            f"K{k}",
            {"model.max_seq_len": block_size // k},
            autoencoder={"model.chunk_size": k, "model.latent_size": 32 * k},
        )
        for k in (1, 2, 4, 8)
    ]


STUDIES: dict[str, str] = {
    "heads": "generative heads: energy, flow matching, diffusion (paper Figs. 8-9)",
    "input": "model input: discrete, continuous, both (paper Table 5)",
    "energy-loss": "energy-loss knobs N, M, alpha, one at a time (paper Tables 3-4)",
    "ae-regularisers": "autoencoder regularisers: full recipe and each switch off (paper Table 2)",
    "latent-size": "autoencoder latent size l with scaled dropout (paper Fig. 7)",
    "chunk-size": "chunk size K with latent 32K (paper Fig. 4)",
}
"""Study name -> what it varies (``calm sweep --study NAME``)."""


def study_variants(name: str, scale: Scale = TINY) -> list[Variant]:
    """The variants of study ``name``; ConfigError (listing the studies) for an unknown name."""
    if name not in STUDIES:
        raise ConfigError(f"unknown study {name!r}; choose one of {', '.join(STUDIES)}")
    if name == "chunk-size":
        return _chunk_size(load_preset("calm", scale.calm_preset, scale.calm_set).train.block_size)
    return {
        "heads": _heads,
        "input": _input,
        "energy-loss": _energy_loss,
        "ae-regularisers": _ae_regularisers,
        "latent-size": _latent_size,
    }[name]()


def _budgets(scale: Scale, vocab_size: int) -> tuple[float, float]:
    """(CALM, autoencoder) training-FLOPs budgets: ``scale``'s steps of the default settings."""
    ae = load_preset("autoencoder", scale.ae_preset, scale.ae_set)
    ae_fpt, _ = stage_flops_per_token("autoencoder", ae, vocab_size, None)
    calm = load_preset("calm", scale.calm_preset, scale.calm_set)
    calm_fpt, _ = stage_flops_per_token("calm", calm, vocab_size, replace(ae.model, vocab_size=vocab_size))
    return calm_fpt * calm.train.batch_tokens * scale.calm_steps, ae_fpt * ae.train.batch_tokens * scale.ae_steps


def data_vocab_size(data: str | Path) -> int:
    """The vocabulary of a prepared data directory, or :data:`DEFAULT_VOCAB_SIZE` if it is not prepared yet."""
    meta = Path(data) / "meta.json"
    return int(read_json(meta)["vocab_size"]) if meta.exists() else DEFAULT_VOCAB_SIZE


def study_spec(
    name: str,
    data: str | Path,
    *,
    scale: str | None = None,
    seeds: int = 1,
    autoencoder: str | Path | None = None,
    evals: int | None = None,
) -> SweepSpec:
    """The sweep spec of a named study (module docstring).

    Args:
        name: one of :data:`STUDIES`.
        data: prepared data directory (it need not exist yet: the vocabulary then defaults to 4096).
        scale: a CALM preset name (S, M, L, XL) for the paper-scale version; None for the tiny default.
        seeds: replicates per setting (seeds 1..N); 1 keeps each preset's seed.
        autoencoder: a trained autoencoder to share instead of training one (shared-AE studies only).
        evals: validation evaluations per run (default: the scale's).

    Raises:
        ConfigError: unknown study or preset, seeds < 1, or an autoencoder given to a study that
            trains one per variant.
    """
    if not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"--seeds must be a positive integer, got {seeds!r}")
    if scale in (None, "tiny"):
        plan = TINY
        if name in TINY_BUDGETS:
            calm_steps, ae_steps, default_evals = TINY_BUDGETS[name]
            plan = replace(TINY, calm_steps=calm_steps, ae_steps=ae_steps, evals=default_evals)
    else:
        plan = paper_scale(scale)
    variants = study_variants(name, plan)
    calm_flops, ae_flops = _budgets(plan, data_vocab_size(data))
    seed_grid = {"train.seed": list(range(1, seeds + 1))} if seeds > 1 else {}
    shared = all(v.autoencoder is None for v in variants)
    raw: dict[str, Any] = {
        "data": str(data),
        "evals": evals or plan.evals,
        "metrics": CALM_METRICS + (HEAD_LOSSES if shared else ["energy_loss"] + AE_METRICS),
        "groups": [],
    }
    if autoencoder is not None and not shared:
        raise ConfigError(f"study {name!r} trains one autoencoder per variant; drop --autoencoder")

    def calm_group(variant: Variant, source: str | None, grid: dict[str, list[Any]]) -> dict[str, Any]:
        settings = {**plan.calm_set, **variant.calm}
        if variant.calm.get("model.head") == "diffusion":
            settings.update(plan.diffusion_set)
        group = {"kind": "calm", "name": variant.label, "preset": plan.calm_preset, "set": settings}
        group.update({"grid": grid, "budget": {"flops": calm_flops}})
        return {**group, "autoencoder": source} if source else group

    def ae_group(group_name: str, settings: dict[str, Any], grid: dict[str, list[Any]]) -> dict[str, Any]:
        return {
            "kind": "autoencoder",
            "name": group_name,
            "preset": plan.ae_preset,
            "set": {**plan.ae_set, **settings},
            "grid": grid,
            "budget": {"flops": ae_flops},
        }

    if shared:
        if autoencoder is not None:
            raw["autoencoder"] = str(autoencoder)
        else:
            raw["groups"].append(ae_group("ae", {}, {}))
        source = None if autoencoder is not None else "@ae"
        raw["groups"] += [calm_group(v, source, seed_grid) for v in variants]
    else:
        for v in variants:
            raw["groups"].append(ae_group(f"ae-{v.label}", v.autoencoder or {}, seed_grid))
            raw["groups"].append(calm_group(v, f"@ae-{v.label}", {}))
    return sweep_from_dict(raw)


def prepare_default_data(data: str | Path, *, progress: bool = True) -> Path:
    """Prepare ``calm demo``'s default data (default corpus, 4096-token BPE) in ``data`` unless it exists."""
    data = Path(data)
    if not (data / "meta.json").exists():
        prepare_demo_data(data, progress=progress)
    return data


def run_study(
    name: str,
    out: str | Path,
    *,
    data: str | Path | None = None,
    scale: str | None = None,
    seeds: int = 1,
    autoencoder: str | Path | None = None,
    evals: int | None = None,
    dry_run: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Run (or finish, or with ``dry_run`` only print) study ``name`` into ``out``; return the result rows.

    Without ``data`` the study prepares ``calm demo``'s default data in ``out/data`` first (not on a
    dry run). The other arguments are :func:`study_spec`'s; outputs are :func:`calm.experiments.sweep.run_sweep`'s.
    """
    data_dir = Path(data) if data is not None else Path(out) / "data"
    spec = study_spec(name, data_dir, scale=scale, seeds=seeds, autoencoder=autoencoder, evals=evals)
    if dry_run:
        return run_sweep(spec, out, dry_run=True, vocab_size=data_vocab_size(data_dir))
    if data is None:
        prepare_default_data(data_dir, progress=progress)
    return run_sweep(spec, out, progress=progress, title=f"Study {name}: {STUDIES[name]}")
