"""``calm convert``: parity with the official modules, full-size structure, and the converted checkpoints
working with the other commands.

The fixtures in ``tests/fixtures/official/`` were written by the authors' own classes (transformers
4.43.0, fp32, eval mode, eager attention; see the README there): small random models saved the way
the official scripts save them, and the official modules' outputs on fixed inputs and injected noise.
Each reference must be matched to a relative deviation (max |ours − theirs| / max |theirs|) of 1e-5.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from calm.checkpoint import load_model
from calm.cli import main
from calm.interop.convert import convert
from calm.interop.official import convert_autoencoder, convert_calm

FIXTURES = Path(__file__).parents[1] / "fixtures" / "official"
TOLERANCE = 1e-5


def relative_deviation(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return float((ours.double() - theirs.double()).abs().max() / theirs.double().abs().max())


@contextlib.contextmanager
def injected_noise(uniform: torch.Tensor | None = None, normal: torch.Tensor | None = None):
    """torch.rand / torch.randn return the recorded draws (shape-checked), as in the fixture script."""
    real_rand, real_randn = torch.rand, torch.randn

    def fake(value: torch.Tensor | None, real):
        def draw(*shape, **kwargs):
            if value is None:
                return real(*shape, **kwargs)
            size = tuple(shape[0]) if len(shape) == 1 and isinstance(shape[0], tuple | list | torch.Size) else shape
            assert tuple(size) == tuple(value.shape), f"drew {tuple(size)}, recorded {tuple(value.shape)}"
            return value.clone()

        return draw

    torch.rand, torch.randn = fake(uniform, real_rand), fake(normal, real_randn)
    try:
        yield
    finally:
        torch.rand, torch.randn = real_rand, real_randn


@pytest.fixture(scope="module")
def converted(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Every fixture folder converted, with the tiny data's 320-token tokenizer (BOS 0, EOS 1, PAD 2)."""
    out = tmp_path_factory.mktemp("converted")
    paths = {}
    for name in ("autoencoder_bin", "autoencoder_safetensors", "calm_bin", "calm_sharded"):
        paths[name] = convert(FIXTURES / name, out / name, tokenizer=data_dir / "tokenizer.json").path
    return paths


@pytest.mark.parametrize("name", ["autoencoder_bin", "autoencoder_safetensors"])
def test_autoencoder_matches_official(converted: dict[str, Path], name: str) -> None:
    """μ, log σ, decoded logits and ids of the official Autoencoder (.bin with the tie; safetensors without)."""
    ref = load_file(str(FIXTURES / "autoencoder_reference.safetensors"))
    model, tok, config = load_model(converted[name])
    assert config["kind"] == "autoencoder" and tok.vocab_size == 320
    ids = ref["ids"].view(2, 3, 4)  # 2 rows of 12 tokens = 3 chunks of K = 4
    with torch.no_grad():
        mu, log_std = model.encode(ids)
        logits = model.decode(ref["mu"]).reshape(2, 12, -1)
        decoded = model.decode_ids(ref["mu"]).reshape(2, 12)
    assert relative_deviation(mu, ref["mu"]) <= TOLERANCE
    assert relative_deviation(log_std, ref["log_std"]) <= TOLERANCE
    assert relative_deviation(logits, ref["decoded_logits"]) <= TOLERANCE
    assert torch.equal(decoded, ref["decoded_ids"])


def calm_deviations(path: Path) -> dict[str, float]:
    """Largest relative deviation from the official EnergyTransformer per reference tensor."""
    ref = load_file(str(FIXTURES / "calm_reference.safetensors"))
    model, _, _ = load_model(path)
    chunks = ref["tokens"].view(2, 5, 4)
    out = {}
    with torch.no_grad():
        h = model.hidden_states(chunks)  # (B, L, d)
        out["hidden_states"] = relative_deviation(h, ref["hidden_states"])
        num = ref["head_uniform"].shape[0]
        head = model.head(h.unsqueeze(0).expand(num, *h.shape), ref["head_uniform"] - 0.5)
        out["head_output"] = relative_deviation(head, ref["head_output"])
        mu, log_std = model.autoencoder.encode(chunks)
        out["ae_mu"] = relative_deviation(mu, ref["ae_mu"])
        out["ae_log_std"] = relative_deviation(log_std, ref["ae_log_std"])
        with injected_noise(uniform=ref["loss_uniform"], normal=ref["loss_target_eps"]):
            loss, _ = model(ref["tokens"])  # the training forward: N head samples vs M = 100 targets
        out["energy_loss"] = relative_deviation(loss.reshape(1), ref["energy_loss"])
        long = load_file(str(FIXTURES / "calm_long_reference.safetensors"))
        h_long = model.hidden_states(long["tokens"].long().view(1, 2048, 4))  # a full 2048-step context
        out["last_hidden_states_2048"] = relative_deviation(h_long[:, -8:], long["last_hidden_states"])
    return out


@pytest.mark.parametrize("name", ["calm_bin", "calm_sharded"])
def test_calm_matches_official(converted: dict[str, Path], name: str) -> None:
    """Backbone hidden states, head outputs for injected noise, embedded AE, energy loss for fixed noise."""
    deviations = calm_deviations(converted[name])
    print(name, json.dumps({k: f"{v:.2e}" for k, v in deviations.items()}))
    assert max(deviations.values()) <= TOLERANCE, deviations


def test_converted_calm_records_source(converted: dict[str, Path]) -> None:
    model, _, config = load_model(converted["calm_bin"])
    official = json.loads((FIXTURES / "calm_bin" / "config.json").read_text())
    assert config["converted_from"]["official_config"]["ae_path"] == official["ae_path"]
    assert (model.config.num_heads, model.config.kv_heads, model.config.head_blocks) == (4, 2, 2)
    assert (model.config.num_samples, model.config.num_target_samples, model.config.max_seq_len) == (3, 100, 2048)
    sharded, _, _ = load_model(converted["calm_sharded"])
    for (k, a), (k2, b) in zip(model.state_dict().items(), sharded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k


# ----------------------------------------------------------------------------- full size, no weights


def _meta_state_dict(entry: dict) -> dict[str, torch.Tensor]:
    return {name: torch.empty(shape, device="meta") for name, shape in entry["keys"]}


@pytest.mark.parametrize(
    "size, params",
    [("M", 371_732_608), ("L", 735_332_480), ("XL", 1_829_795_968)],
)
def test_full_size_structure_converts(size: str, params: int) -> None:
    """The key lists and shapes the official classes produce at full size convert without error."""
    entry = json.loads((FIXTURES / "full_size_structure.json").read_text())[size]
    sd = _meta_state_dict(entry)
    assert len(sd) == 288  # .bin key count at L = 16, 4 head blocks (both aliases included)
    calm_cfg, ae_cfg, weights = convert_calm(entry["config"], sd)
    assert all(t.is_meta for t in weights.values())
    assert len(weights) == 288 - 1 - (14 + 10 * 4)  # minus the AE output alias and the duplicate head
    assert (calm_cfg.vocab_size, calm_cfg.chunk_size, calm_cfg.latent_size, calm_cfg.noise_size) == (128257, 4, 128, 64)
    assert (ae_cfg.hidden_size, ae_cfg.intermediate_size, ae_cfg.num_encoder_layers) == (512, 1280, 2)
    lm_params = sum(t.numel() for k, t in weights.items() if not k.startswith("autoencoder."))
    assert lm_params == params  # the paper's 371M / 735M / 1.82B (AE excluded)


def test_full_size_autoencoder_structure_converts() -> None:
    entry = json.loads((FIXTURES / "full_size_structure.json").read_text())["autoencoder"]
    sd = _meta_state_dict(entry)
    assert len(sd) == 28
    cfg, weights = convert_autoencoder(entry["config"], sd)
    assert len(weights) == 27 and cfg.vocab_size == 128257
    assert sum(t.numel() for t in weights.values()) == 75_832_064  # the released AE's ≈ 75.83M


# ----------------------------------------------------------------------------- the other commands


def test_converted_checkpoints_work_with_commands(
    converted: dict[str, Path], data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    calm, ae = str(converted["calm_bin"]), str(converted["autoencoder_bin"])
    assert main(["generate", "--checkpoint", calm, "--prompt", "The river", "--max-new-tokens", "8", "--quiet"]) == 0
    assert "The river" in capsys.readouterr().out
    args = ["generate", "--checkpoint", calm, "--prompt", "A", "--max-new-tokens", "8", "--temperature", "0.5"]
    assert main([*args, "--num-samples", "16", "--seed", "1", "--quiet"]) == 0
    result = tmp_path / "eval.json"
    args = ["eval", "--checkpoint", calm, "--data", str(data_dir), "--context-steps", "8", "--max-blocks", "2"]
    assert main([*args, "--json", str(result), "--no-progress"]) == 0
    assert 0.0 <= json.loads(result.read_text())["brierlm"] <= 100.0
    assert main(["eval-ae", "--checkpoint", ae, "--data", str(data_dir), "--max-chunks", "64", "--json"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tokens"] > 0
    run = tmp_path / "finetune"
    args = ["train-calm", "--data", str(data_dir), "--autoencoder", ae, "--out", str(run), "--max-steps", "1"]
    assert main([*args, "--set", "train.batch_tokens=256", "--set", "train.block_size=64", "--no-progress"]) == 0
    assert load_model(run)[2]["autoencoder"]["hidden_size"] == 16


def test_hub_source_uses_the_hub_cache(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """``hf:REPO@REV`` goes through ``snapshot_download`` (replaced here: no network in tests), and a
    released repository's kind is known: the autoencoder's files under CALM-M's name are refused."""
    hub = pytest.importorskip("huggingface_hub")
    calls = []

    def fake_snapshot_download(repo_id: str, revision=None, allow_patterns=None, cache_dir=None) -> str:
        calls.append((repo_id, revision))
        return str(FIXTURES / ("calm_bin" if repo_id == "someone/tiny-calm" else "autoencoder_bin"))

    monkeypatch.setattr(hub, "snapshot_download", fake_snapshot_download)
    tok = str(data_dir / "tokenizer.json")
    result = convert("hf:someone/tiny-calm@v1", tmp_path / "a", tokenizer=tok)
    assert result.kind == "calm" and calls[-1] == ("someone/tiny-calm", "v1")
    assert load_model(result.path)[2]["converted_from"]["source"] == "hf:someone/tiny-calm@v1"
    code = main(["convert", "hf:cccczshao/CALM-M", "--out", str(tmp_path / "b"), "--tokenizer", tok])
    assert code == 2 and "holds a CALM-Autoencoder, not a CALM" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_bf16_source(data_dir: Path, tmp_path: Path) -> None:
    """A bf16 state dict converts as bf16 and loads into the fp32 model (values exactly preserved)."""
    source = tmp_path / "ae_bf16"
    source.mkdir()
    (source / "config.json").write_text((FIXTURES / "autoencoder_bin" / "config.json").read_text())
    sd = torch.load(FIXTURES / "autoencoder_bin" / "pytorch_model.bin", weights_only=True)
    torch.save({k: v.to(torch.bfloat16) for k, v in sd.items()}, source / "pytorch_model.bin")
    result = convert(source, tmp_path / "out", tokenizer=data_dir / "tokenizer.json")
    assert result.dtype == "bfloat16"
    model, _, _ = load_model(result.path)
    expected = sd["encoder.embed_tokens.weight"].to(torch.bfloat16).float()
    assert torch.equal(model.embed_tokens.weight, expected)
