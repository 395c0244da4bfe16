"""Generative heads (energy, flow, diffusion) and backbone inputs behind one interface (paper Table 5, Figs. 8-9).

Each head/input variant must work unchanged with generation (KV cache equals full recompute, both
temperature samplers), the BrierLM rollout driver, checkpoints and the FLOP accounting.
"""

from __future__ import annotations

import math
from dataclasses import asdict

import factories
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from calm.checkpoint import load_model, save_checkpoint
from calm.config import AutoencoderConfig, CALMConfig, ConfigError, load_preset
from calm.eval.brier import calm_block_brier
from calm.generate.engine import generate
from calm.models.calm import CALM
from calm.models.flops import calm_flops, head_params, head_passes_per_sample, input_params
from calm.models.heads import DiffusionHead, EnergyHead, FlowHead, cosine_alphas_cumprod, respaced_steps

VOCAB = 50
VARIANTS = [("energy", "discrete"), ("flow", "discrete"), ("diffusion", "discrete"), ("energy", "continuous")]
VARIANTS += [("energy", "both"), ("flow", "both"), ("anchored", "discrete")]
IDS = [f"{h}-{i}" for h, i in VARIANTS]
ANCHORED = {"head": "energy", "token_anchor": True, "token_aux_weight": 0.3}
"""``head="anchored"`` here: the energy head anchored on a discrete first token (ours, ``token_anchor``)."""


def variant(head: str = "energy", input: str = "discrete", vocab: int = VOCAB, **kw) -> CALM:
    """``factories.tiny_calm`` with this head and input (10 diffusion steps), in eval mode, its head's output
    layer redrawn with std 0.5 (it starts at zero) so that samples are not trivial."""
    kind = ANCHORED if head == "anchored" else {"head": head}
    return factories.tiny_calm(vocab=vocab, input=input, head_std=0.5, **{"diffusion_steps": 10, **kind, **kw}).eval()


def test_head_classes_follow_the_config():
    assert isinstance(variant("energy").head, EnergyHead)
    assert isinstance(variant("flow").head, FlowHead)
    assert isinstance(variant("diffusion").head, DiffusionHead)
    with pytest.raises(ConfigError, match="head='gan' is unknown; choose one of energy, flow, diffusion"):
        variant("gan")
    with pytest.raises(ConfigError, match="input='latent' is unknown"):
        variant(input="latent")
    with pytest.raises(ConfigError, match="diffusion_steps=2000 must be in 1..diffusion_train_steps=1000"):
        variant("diffusion", diffusion_steps=2000)


def test_every_switch_is_reachable_as_a_checked_override():
    preset = load_preset(
        "calm", "tiny", {"model.head": "flow", "model.flow_steps": 2, "model.input": "both", "model.energy_alpha": 1.5}
    )
    assert (preset.model.head, preset.model.flow_steps, preset.model.input) == ("flow", 2, "both")
    with pytest.raises(ConfigError, match="model.flow_steps='x' is not valid"):
        load_preset("calm", "tiny", {"model.flow_steps": "x"})


@pytest.mark.parametrize("head,input", VARIANTS, ids=IDS)
def test_sample_shapes_and_loss_gradients(head, input):
    model = variant(head, input).train()
    h = torch.randn(3, 5, 32)
    z = model.head.sample(h, 6, torch.Generator().manual_seed(0))
    assert z.shape == (6, 3, 5, 8)
    assert z.std(0).mean() > 0.01  # independent samples differ
    loss, metrics = model(torch.randint(0, VOCAB, (2, 16)))
    loss.backward()
    assert torch.isfinite(loss) and "sample_dist" in metrics
    assert all(p.grad is None for p in model.autoencoder.parameters())
    trained = [n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert any(n.startswith("head.") for n in trained) and any(n.startswith("backbone.") for n in trained)
    if input != "discrete":
        assert model.latent_proj.weight.grad.abs().sum() > 0  # the latent input is in the graph


@pytest.mark.parametrize("head,input", VARIANTS, ids=IDS)
@pytest.mark.parametrize("temperature,sampler", [(1.0, "batch"), (0.5, "batch"), (0.5, "exact")])
def test_generation_with_cache_equals_without(head, input, temperature, sampler):
    model = variant(head, input)
    prompt = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    kw = dict(temperature=temperature, num_samples=8, sampler=sampler)
    a = generate(model, prompt, 16, generator=torch.Generator().manual_seed(3), use_cache=True, **kw)
    b = generate(model, prompt, 16, generator=torch.Generator().manual_seed(3), use_cache=False, **kw)
    assert a == b
    assert all(len(row) == 16 for row in a)


@pytest.mark.parametrize("head,input", VARIANTS, ids=IDS)
def test_brier_rollout_conditions_on_the_true_prefix(head, input):
    """The BrierLM driver's first call sees the teacher-forced hidden states of the full forward."""
    model = variant(head, input)
    block = torch.randint(0, VOCAB, (1, 40), generator=torch.Generator().manual_seed(2))
    seen = []
    real = model.sample_next

    def spy(h, n, generator=None):
        seen.append(h.clone())
        return real(h, n, generator)

    model.sample_next = spy
    est = calm_block_brier(model, block, generator=torch.Generator().manual_seed(0))
    del model.sample_next
    assert est.shape == (9, 4) and torch.all(est <= 2) and torch.all(est >= -1)
    chunks = block.view(1, -1, 4)
    torch.testing.assert_close(seen[0], model.hidden_states(chunks[:, :-1])[0], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("head,input", VARIANTS, ids=IDS)
def test_checkpoint_round_trip_is_bit_identical(head, input, tiny_tokenizer, tmp_path):
    model = variant(head, input, vocab=tiny_tokenizer.vocab_size)
    config = {
        "kind": "calm",
        "model": asdict(model.config),
        "autoencoder": asdict(model.autoencoder.config),
        "tokenizer_sha256": tiny_tokenizer.sha256,
    }
    path = save_checkpoint(tmp_path / "ckpt", model=model, config=config, tokenizer_json=tiny_tokenizer.to_str())
    loaded, _, saved = load_model(path, kind="calm")
    assert saved["model"]["head"] == model.config.head and saved["model"]["input"] == input
    assert type(loaded.head) is type(model.head)
    ours, theirs = model.state_dict(), loaded.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    prompt = torch.randint(0, tiny_tokenizer.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    a = generate(model, prompt, 12, generator=torch.Generator().manual_seed(5))
    b = generate(loaded, prompt, 12, generator=torch.Generator().manual_seed(5))
    assert a == b


def _head_net_calls(model: CALM, fn) -> int:
    calls = []
    handle = model.head.register_forward_hook(lambda *args: calls.append(1))
    fn()
    handle.remove()
    return len(calls)


@pytest.mark.parametrize("head,passes", [("energy", 1), ("flow", 8), ("diffusion", 10)])
def test_passes_per_sample_are_what_the_sampler_runs(head, passes):
    model = variant(head)
    assert head_passes_per_sample(model.config) == type(model.head).passes_per_sample(model.config) == passes
    h = torch.randn(3, 32)
    assert _head_net_calls(model, lambda: model.head.sample(h, 2)) == passes  # each pass handles all rows
    if head != "energy":
        # the step count is read at sampling time: an argument or a config change applies at once
        assert _head_net_calls(model, lambda: model.head.sample(h, 2, steps=3)) == (6 if head == "flow" else 3)
        setattr(model.config, f"{head}_steps", 2)
        assert _head_net_calls(model, lambda: model.head.sample(h, 2)) == (4 if head == "flow" else 2)


@pytest.mark.parametrize("head,input", VARIANTS, ids=IDS)
def test_flops_accounting_matches_the_model(head, input):
    model = variant(head, input)
    cfg = model.config
    flops = calm_flops(cfg, model.autoencoder.config, context=8)
    assert flops["params"] == model.num_parameters()
    assert flops["head_params"] == sum(p.numel() for p in model.head.parameters())
    proj = sum(p.numel() for n, p in model.named_parameters() if n.startswith(("embed_proj.", "latent_proj.")))
    assert input_params(cfg)[0] == proj
    rows = 64
    h = torch.randn(rows, 32)
    with FlopCounterMode(display=False) as counter:
        model.head.sample(h, 1)
    per_row = counter.get_total_flops() / rows  # one sample: the head passes, plus the anchored head's readout
    expected = flops["head_passes_per_sample"] * 2 * head_params(cfg)[1]
    readout = flops["breakdown"]["inference_per_step"].get("token_readout", 0)
    assert (readout > 0) == (head == "anchored")
    assert per_row == pytest.approx(expected + readout, rel=0.05)
    assert flops["breakdown"]["inference_per_step"]["head"] == expected
    assert ("ae_encoder" in flops["breakdown"]["inference_per_step"]) == (input != "discrete")


def test_flow_and_diffusion_cost_what_the_paper_says_relative_to_energy():
    """Paper Figs. 8-9: energy 1 pass per sample, flow 2 per midpoint step (4 steps: 8), diffusion ~100."""
    cfgs = {h: CALMConfig(hidden_size=1024, intermediate_size=2752, num_layers=16, head=h) for h in ("energy", "flow")}
    cfgs["diffusion"] = CALMConfig(hidden_size=1024, intermediate_size=2752, num_layers=16, head="diffusion")
    ae = AutoencoderConfig()
    head = {h: calm_flops(c, ae)["breakdown"]["inference_per_step"]["head"] for h, c in cfgs.items()}
    assert head["flow"] / head["energy"] == pytest.approx(8, rel=0.1)
    assert head["diffusion"] / head["energy"] == pytest.approx(100, rel=0.1)


def test_cosine_schedule_and_respacing():
    ab = cosine_alphas_cumprod(1000)
    assert ab.shape == (1000,) and torch.all(ab[1:] < ab[:-1]) and 0 < float(ab[-1]) < 1e-6
    s = 0.008  # ᾱ(t) = cos²((t/T + s)/(1 + s)·π/2)/cos²(s/(1 + s)·π/2), IDDPM Eq. 17
    ref = math.cos((500 / 1000 + s) / (1 + s) * math.pi / 2) ** 2 / math.cos(s / (1 + s) * math.pi / 2) ** 2
    assert float(ab[499]) == pytest.approx(ref, rel=1e-9)
    assert respaced_steps(1000, 100)[:3] == [0, 10, 20] and respaced_steps(1000, 100)[-1] == 999
    assert respaced_steps(1000, 1) == [999]
    with pytest.raises(ValueError, match="must be in 1..1000"):
        respaced_steps(1000, 0)


def test_diffusion_sampler_recovers_a_gaussian_with_the_exact_noise_predictor():
    """With the Bayes-optimal ε̂ for data N(m, s²) the 100-step sampler returns N(m, s²) (tolerance 10% on s)."""
    model = variant("diffusion", diffusion_steps=100)
    head = model.head
    m, s = torch.linspace(-3, 3, 8), torch.linspace(0.2, 1.0, 8)

    def exact_noise(x, t, h):
        a = head.alphas_cumprod[t][..., None]
        return (1 - a).sqrt() * (x - a.sqrt() * m) / (a * s**2 + 1 - a)

    head.predict_noise = exact_noise
    z = head.sample(torch.zeros(20000, 32), 1, torch.Generator().manual_seed(0))[0]
    assert torch.allclose(z.mean(0), m, atol=0.05)
    assert torch.allclose(z.std(0), s, rtol=0.1)


def test_flow_sampler_integrates_the_exact_velocity():
    """With the exact velocity of a Gaussian target the 4-step midpoint sampler lands on N(m, s²) (10% on s)."""
    model = variant("flow")
    head = model.head
    m, s = torch.linspace(-3, 3, 8), torch.linspace(0.2, 1.0, 8)

    def exact_velocity(x, t, h):  # x_t = (1 - t) x0 + t z: E[z - x0 | x_t] for z ~ N(m, s²)
        t = (t / 1000)[..., None]
        var = (1 - t) ** 2 + t**2 * s**2
        z_hat = m + t * s**2 * (x - t * m) / var
        x0_hat = (x - t * z_hat) / (1 - t).clamp(min=1e-6)
        return z_hat - x0_hat

    head.forward = exact_velocity
    z = head.sample(torch.zeros(20000, 32), 1, torch.Generator().manual_seed(0))[0]
    assert torch.allclose(z.mean(0), m, atol=0.05)
    assert torch.allclose(z.std(0), s, rtol=0.1)


def _save(model: CALM, tokenizer, path) -> str:
    config = {
        "kind": "calm",
        "model": asdict(model.config),
        "autoencoder": asdict(model.autoencoder.config),
        "tokenizer_sha256": tokenizer.sha256,
    }
    return str(save_checkpoint(path, model=model, config=config, tokenizer_json=tokenizer.to_str()))


def test_cli_head_steps_override_reaches_the_sampler(tiny_tokenizer, tmp_path, monkeypatch, capsys):
    from calm.cli import main

    flow = _save(variant("flow", vocab=tiny_tokenizer.vocab_size), tiny_tokenizer, tmp_path / "flow")
    energy = _save(variant("energy", vocab=tiny_tokenizer.vocab_size), tiny_tokenizer, tmp_path / "energy")
    calls = []
    real = FlowHead.forward
    monkeypatch.setattr(FlowHead, "forward", lambda self, *a: calls.append(1) or real(self, *a))
    argv = ["generate", "--checkpoint", flow, "--prompt", "The river", "--max-new-tokens", "8", "--quiet"]
    argv += ["--no-stop-at-document-end", "--seed", "0"]
    counts = {}
    for steps in (1, 3):
        calls.clear()
        assert main([*argv, "--head-steps", str(steps)]) == 0
        counts[steps] = len(calls)
    assert counts[3] == 3 * counts[1] and counts[1] == 2 * 2  # 2 chunks of K = 4, 2 passes per midpoint step
    capsys.readouterr()
    assert main(["generate", "--checkpoint", energy, "--prompt", "x", "--head-steps", "2"]) == 2
    assert "sampling steps apply to flow and diffusion heads" in capsys.readouterr().err
    assert main([*argv, "--head-steps", "0"]) == 2
    assert "flow_steps must be >= 1" in capsys.readouterr().err


def test_cli_flops_takes_head_and_input_overrides(capsys):
    from calm.cli import main

    assert main(["flops", "--model", "calm", "--preset", "M", "--set", "model.head=diffusion", "--json"]) == 0
    out = capsys.readouterr().out
    assert '"head_passes_per_sample": 100' in out
    assert main(["flops", "--model", "calm", "--preset", "M", "--set", "model.head=gan"]) == 2
    assert "head='gan' is unknown" in capsys.readouterr().err


def test_eval_head_steps_override(tiny_tokenizer, tiny_corpus, tmp_path, monkeypatch):
    from calm.eval.brier import evaluate_checkpoint

    path = _save(variant("diffusion", vocab=tiny_tokenizer.vocab_size), tiny_tokenizer, tmp_path / "diffusion")
    steps_seen = []
    real = DiffusionHead.sample

    def spy(self, h, n, generator=None, steps=None):
        steps_seen.append(self.config.diffusion_steps)
        return real(self, h, n, generator, steps)

    monkeypatch.setattr(DiffusionHead, "sample", spy)
    kw = dict(max_blocks=1, context_steps=8, progress=False, device="cpu", precision="fp32")
    result = evaluate_checkpoint(path, str(tiny_corpus), head_steps=3, **kw)
    assert result["head"] == "diffusion" and result["head_steps"] == 3
    assert steps_seen and set(steps_seen) == {3}
    with pytest.raises(ValueError, match="diffusion_steps=0 must be in 1..diffusion_train_steps=1000"):
        evaluate_checkpoint(path, str(tiny_corpus), head_steps=0, **kw)


@pytest.mark.parametrize("input", ["continuous", "both"])
def test_generation_feeds_the_generated_chunks_latent(input):
    """Each generation step's latent input is μ of the chunk just generated (re-encoded), in both cache modes."""
    model = variant(input=input)
    fed = []
    handle = model.latent_proj.register_forward_hook(lambda mod, args, out: fed.append(args[0].detach().clone()))
    prompt = torch.randint(0, VOCAB, (2, 8), generator=torch.Generator().manual_seed(1))
    for use_cache in (True, False):
        fed.clear()
        new = generate(model, prompt, 12, generator=torch.Generator().manual_seed(3), use_cache=use_cache)
        chunks = torch.cat([prompt, torch.tensor(new)], dim=1).view(2, -1, 4)
        mu = model.target_posterior(chunks)[0]  # (2, 5, l): 2 prompt chunks + 3 generated
        last = fed[-1]  # the last step fed chunks up to the second generated one
        torch.testing.assert_close(last[:, -1], mu[:, 3])
        if not use_cache:
            torch.testing.assert_close(last, mu[:, :4])
    handle.remove()


def test_training_stage_runs_each_head_and_input_end_to_end(tiny_data_dir, tmp_path):
    """``calm train-calm``'s stage trains, evaluates (BrierLM), checkpoints and reloads every variant."""
    import json

    from calm.train.loop import run_training
    from calm.train.stages import AutoencoderStage, CALMStage

    torch.manual_seed(0)
    ae_cfg = factories.autoencoder_config(kl_mode="plain")
    ae_stage = AutoencoderStage(tiny_data_dir, ae_cfg, factories.train_config(batch_tokens=256))
    run_training(ae_stage, ae_stage.train_config, tmp_path / "ae", progress=False)
    for head, input in (("flow", "both"), ("diffusion", "continuous")):
        cfg = factories.calm_config(head=head, input=input, diffusion_steps=5)
        stage = CALMStage(tiny_data_dir, cfg, factories.train_config(), tmp_path / "ae")
        run_training(stage, stage.train_config, tmp_path / head, progress=False)
        records = [json.loads(x) for x in (tmp_path / head / "metrics.jsonl").read_text().splitlines()]
        train = [r for r in records if r["split"] == "train"]
        assert f"{head}_loss" in train[-1] and math.isfinite(train[-1]["loss"])
        val = [r for r in records if r["split"] == "val"]
        assert any("brierlm" in r for r in val) and all(f"{head}_loss" in r and "energy_loss" not in r for r in val)
        model, _, config = load_model(tmp_path / head, kind="calm")
        assert (type(model.head), model.config.input) == ({"flow": FlowHead, "diffusion": DiffusionHead}[head], input)
        assert config["autoencoder"]["kl_mode"] == "plain"


@pytest.mark.parametrize("head", ["flow", "diffusion"])
def test_head_diagnostics_work_for_flow_and_diffusion_with_common_random_numbers(head):
    """``calm.eval.diagnostics`` on any head: a head that ignores h has exactly zero conditioning gap."""
    from calm.eval.diagnostics import head_diagnostics

    model = variant(head)
    blocks = torch.randint(0, VOCAB, (3, 64), generator=torch.Generator().manual_seed(0))
    uses = head_diagnostics(model, blocks, max_positions=40, num_point_samples=4)
    assert uses.cond_gap != 0.0 and uses.diag_positions == 40
    assert uses == head_diagnostics(model, blocks, max_positions=40, num_point_samples=4)  # deterministic
    torch.nn.init.zeros_(model.head.hidden_embd.weight)  # c no longer depends on h
    ignores = head_diagnostics(model, blocks, max_positions=40, num_point_samples=4)
    assert ignores.cond_gap == 0.0 and ignores.noise_floor == uses.noise_floor


def test_energy_mean_weight_adds_the_alpha_two_score_and_only_that():
    tokens = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    losses = {}
    for weight in (0.0, 0.5):
        model = factories.tiny_calm(energy_mean_weight=weight)
        torch.manual_seed(1)
        losses[weight] = model(tokens)
    (_, plain_m), (total, m) = losses[0.0], losses[0.5]
    assert "mean_loss" not in plain_m and "mean_loss" in m
    assert torch.allclose(m["energy_loss"], plain_m["energy_loss"])  # same draws: the alpha-1 part is unchanged
    assert torch.allclose(total, m["energy_loss"] + 0.5 * m["mean_loss"])
    assert float(m["mean_loss"]) > 0  # 2||E x - E z||^2 + 2 tr Cov(z) at init


@pytest.mark.parametrize("overrides", [{"energy_mean_weight": -0.1}, {"energy_mean_weight": 0.1, "head": "flow"}])
def test_energy_mean_weight_bad_values_are_refused(overrides):
    with pytest.raises(ConfigError, match="energy_mean_weight"):
        factories.tiny_calm(**overrides)


def test_token_aux_weight_adds_a_next_token_cross_entropy_and_its_flops():
    from calm.models.flops import calm_flops

    tokens = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    plain = factories.tiny_calm()
    model = factories.tiny_calm(token_aux_weight=0.5)
    assert not hasattr(plain, "token_aux_head") and model.token_aux_head.weight.shape == (50, 32)
    assert model.num_parameters() == plain.num_parameters()  # training-only: not counted
    torch.manual_seed(1)
    loss, metrics = model(tokens)
    logits = model.token_aux_head(model.hidden_states(tokens.view(2, 4, 4)[:, :-1]))
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 50), tokens.view(2, 4, 4)[:, 1:, 0].reshape(-1))
    assert torch.allclose(metrics["token_aux_loss"], expected, atol=1e-6)
    assert torch.allclose(loss, metrics["energy_loss"] + 0.5 * metrics["token_aux_loss"], atol=1e-6)
    loss.backward()
    assert model.token_aux_head.weight.grad.abs().sum() > 0
    extra = calm_flops(model.config, model.autoencoder.config)["train_forward_flops_per_step"]
    base = calm_flops(plain.config, plain.autoencoder.config)["train_forward_flops_per_step"]
    assert extra - base == 2 * 32 * 50
    with pytest.raises(ConfigError, match="token_aux_weight"):
        factories.tiny_calm(token_aux_weight=-1.0)


def test_energy_diversity_weight_sharpens_the_training_loss_but_reports_the_proper_score():
    tokens = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    results = {}
    for weight in (1.0, 0.6):
        model = factories.tiny_calm(energy_diversity_weight=weight, head_std=0.3, head_seed=2)
        torch.manual_seed(1)
        results[weight] = model(tokens)
    (plain_loss, plain_m), (loss, m) = results[1.0], results[0.6]
    assert torch.allclose(m["energy_loss"], plain_m["energy_loss"])  # same draws: the reported score is the paper's
    assert torch.allclose(plain_loss, plain_m["energy_loss"])
    # loss = 2·fidelity − λ·diversity, so the gap to the proper score is (1 − λ)·diversity > 0
    assert float((loss - m["energy_loss"]).detach()) > 0.01


@pytest.mark.parametrize(
    "overrides",
    [
        {"energy_diversity_weight": 0.0},
        {"energy_diversity_weight": 1.2},
        {"energy_diversity_weight": 0.5, "head": "flow"},
    ],
)
def test_energy_diversity_weight_bad_values_are_refused(overrides):
    with pytest.raises(ConfigError, match="energy_diversity_weight"):
        factories.tiny_calm(**overrides)


def test_token_aux_tokens_reads_out_the_first_n_tokens_of_the_next_chunk():
    from calm.models.flops import calm_flops

    tokens = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    model = factories.tiny_calm(token_aux_weight=0.5, token_aux_tokens=3)
    assert model.token_aux_head.weight.shape == (3 * 50, 32)
    torch.manual_seed(1)
    _, metrics = model(tokens)
    logits = model.token_aux_head(model.hidden_states(tokens.view(2, 4, 4)[:, :-1])).reshape(-1, 50)
    expected = torch.nn.functional.cross_entropy(logits, tokens.view(2, 4, 4)[:, 1:, :3].reshape(-1))
    assert torch.allclose(metrics["token_aux_loss"], expected, atol=1e-6)
    one = factories.tiny_calm(token_aux_weight=0.5)
    flops = [calm_flops(m.config, m.autoencoder.config)["train_forward_flops_per_step"] for m in (model, one)]
    assert flops[0] - flops[1] == 2 * 32 * 2 * 50
    with pytest.raises(ConfigError, match="token_aux_tokens"):
        factories.tiny_calm(token_aux_weight=0.5, token_aux_tokens=5)


def test_token_score_trains_the_head_through_a_probe_that_learns_only_from_true_latents():
    from calm.models.flops import calm_flops, head_params

    tokens = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(0))
    plain = factories.tiny_calm()
    model = factories.tiny_calm(token_score_weight=0.5, token_score_samples=3)
    lat = model.config.latent_size
    assert model.latent_probe.weight.shape == (50, lat) and model.num_parameters() == plain.num_parameters()
    torch.manual_seed(1)
    loss, metrics = model(tokens)
    assert torch.allclose(
        loss, metrics["energy_loss"] + 0.5 * metrics["token_score"] + metrics["probe_loss"], atol=1e-5
    )
    assert 0 < float(metrics["token_score"]) and 0 < float(metrics["probe_loss"])
    # the probe learns from its own loss only; the token score trains the head, not the probe
    model.zero_grad()
    h = model.hidden_states(tokens.view(2, 4, 4)[:, :-1]).reshape(-1, 32)
    mu, log_std = model.target_posterior(tokens.view(2, 4, 4)[:, 1:])
    score, probe_loss = model.token_score(
        h, mu.reshape(-1, lat), log_std.reshape(-1, lat), tokens.view(2, 4, 4)[:, 1:, 0].reshape(-1)
    )
    score.backward(retain_graph=True)
    assert model.latent_probe.weight.grad is None and model.head.final_out.weight.grad.abs().sum() > 0
    head_grad = model.head.final_out.weight.grad.clone()
    probe_loss.backward()
    assert model.latent_probe.weight.grad.abs().sum() > 0
    assert torch.equal(model.head.final_out.weight.grad, head_grad)
    extra = calm_flops(model.config, model.autoencoder.config)["train_forward_flops_per_step"]
    base = calm_flops(plain.config, plain.autoencoder.config)["train_forward_flops_per_step"]
    assert extra - base == 3 * 2 * head_params(model.config)[1] + 2 * lat * 50 * 4
    for bad in ({"token_score_weight": -1.0}, {"token_score_weight": 0.5, "head": "flow"}, {"token_score_samples": 0}):
        with pytest.raises(ConfigError, match="token_score"):
            factories.tiny_calm(**bad)


def test_token_score_of_a_head_that_decodes_the_true_token_is_low():
    """Known answer: with a probe that reads token t off latent dimension t, a head whose samples sit on the
    true first token's dimension scores far lower than one whose samples point elsewhere."""
    model = factories.tiny_calm(token_score_weight=1.0, token_score_samples=2)
    lat = model.config.latent_size
    with torch.no_grad():
        model.latent_probe.weight.zero_()
        model.latent_probe.bias.fill_(-50.0)
        model.latent_probe.bias[:lat] = 0.0
        model.latent_probe.weight[:lat] = 20.0 * torch.eye(lat)
    first = torch.arange(4) % lat
    right = torch.nn.functional.one_hot(first, lat).float()
    wrong = torch.nn.functional.one_hot((first + 1) % lat, lat).float()
    scores = {}
    for name, target in (("right", right), ("wrong", wrong)):
        model.head.sample = lambda h, n, generator=None, t=target: t.expand(n, *t.shape)
        scores[name] = model.token_score(torch.zeros(4, 32), right, torch.full((4, lat), -30.0), first)[0]
    assert scores["right"] < 0.01 and scores["wrong"] > 15.0


@pytest.mark.parametrize(("head", "input"), VARIANTS, ids=IDS)
def test_one_generator_per_row_draws_what_each_row_draws_alone(head, input):
    """Continuous batching (``calm.models.rng``): sampling rows with a generator each equals sampling each
    row alone with its generator, for every head (the diffusion head draws noise at every step)."""
    model = variant(head, input)
    h = torch.randn(3, model.config.hidden_size)
    seeds = [11, 12, 13]
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    together = model.sample_next(h, 5, gens)
    for b, s in enumerate(seeds):
        one = model.sample_next(h[b : b + 1], 5, torch.Generator().manual_seed(s))
        torch.testing.assert_close(together.latents[:, b : b + 1], one.latents, atol=1e-5, rtol=1e-5)
        if one.prefix is not None:
            assert torch.equal(together.prefix[:, b : b + 1], one.prefix)
    with pytest.raises(ValueError, match="2 generators for 3 rows"):
        model.sample_next(h, 5, gens[:2])
