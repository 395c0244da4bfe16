"""``calm convert`` on bad input: one ``error:`` line naming the problem and the fix, exit 2, nothing written.

Each case damages a copy of an official fixture folder (``tests/fixtures/official``) the way a
download or a hand edit can, and runs the console entry point in-process.
"""

from __future__ import annotations

import datetime
import json
import re
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from calm.cli import main
from calm.data.tokenizer import train_bpe

FIXTURES = Path(__file__).parents[1] / "fixtures" / "official"


def _edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    config.update(changes)
    (folder / "config.json").write_text(json.dumps(config))


def _edit_weights(folder: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    path = folder / "pytorch_model.bin"
    sd = torch.load(path, weights_only=True)
    edit(sd)
    torch.save(sd, path)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _different_generator(sd: dict[str, torch.Tensor]) -> None:
    sd["mlp_generator.noise_embd.bias"] = sd["generative_head.noise_embd.bias"] + 1.0


def _foreign_object(sd: dict[str, torch.Tensor]) -> None:
    sd["saved_at"] = datetime.date(2025, 10, 30)  # anything but tensors needs a full unpickle


CASES = {
    "autoencoder given as CALM": (
        "autoencoder_bin",
        lambda f: None,
        ["--kind", "calm"],
        "holds a CALM-Autoencoder, not a CALM",
    ),
    "CALM config with autoencoder weights": (
        "autoencoder_bin",
        lambda f: _edit_config(f, architectures=["EnergyTransformer"]),
        [],
        "config.json and the weights come from different repositories",
    ),
    "truncated .bin": (
        "calm_bin",
        lambda f: _truncate(f / "pytorch_model.bin"),
        [],
        "pytorch_model.bin cannot be read as a PyTorch state dict .* truncated or corrupt: download it again",
    ),
    "truncated safetensors": (
        "autoencoder_safetensors",
        lambda f: _truncate(f / "model.safetensors"),
        [],
        "model.safetensors is truncated or corrupt",
    ),
    "missing shard": (
        "calm_sharded",
        lambda f: (f / "pytorch_model-00002-of-00004.bin").unlink(),
        [],
        "pytorch_model-00002-of-00004.bin is missing; download it again",
    ),
    "heads do not divide the width": (
        "calm_bin",
        lambda f: _edit_config(f, num_attention_heads=3),
        [],
        "num_attention_heads=3, which does not divide hidden_size=16",
    ),
    "unknown key": (
        "calm_bin",
        lambda f: _edit_weights(
            f, lambda sd: sd.update({"transformer.layers.0.self_attn.q_proj.bias": torch.zeros(16)})
        ),
        [],
        r"keys the official layout does not know: \['transformer.layers.0.self_attn.q_proj.bias'\]",
    ),
    "missing key": (
        "calm_bin",
        lambda f: _edit_weights(f, lambda sd: sd.pop("transformer.layers.1.mlp.up_proj.weight")),
        [],
        r"weights lack \['transformer.layers.1.mlp.up_proj.weight'\]",
    ),
    "config disagrees with the tensors": (
        "calm_bin",
        lambda f: _edit_config(f, intermediate_size=32),
        [],
        "config.json says intermediate_size=32 but the weights imply intermediate_size=24",
    ),
    "generator aliases differ": (
        "calm_bin",
        lambda f: _edit_weights(f, _different_generator),
        [],
        "mlp_generator.noise_embd.bias differs from generative_head.noise_embd.bias",
    ),
    "pickled objects": (
        "autoencoder_bin",
        lambda f: _edit_weights(f, _foreign_object),
        [],
        "refused without unpickling it",
    ),
    "no weights": (
        "calm_bin",
        lambda f: (f / "pytorch_model.bin").unlink(),
        [],
        "has config.json but no weights",
    ),
    "flow head": (
        "calm_bin",
        lambda f: _edit_config(f, model_type="flow"),
        [],
        "only the energy head",
    ),
}


@pytest.fixture
def tokenizer_json(data_dir: Path) -> str:
    return str(data_dir / "tokenizer.json")


def _run(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = main(["convert", *args])
    return code, capsys.readouterr().err


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_official_folder(case: str, tmp_path: Path, tokenizer_json: str, capsys: pytest.CaptureFixture) -> None:
    fixture, damage, extra, message = CASES[case]
    source = Path(shutil.copytree(FIXTURES / fixture, tmp_path / "source"))
    damage(source)
    out = tmp_path / "out" / "converted"
    code, err = _run([str(source), "--out", str(out), "--tokenizer", tokenizer_json, *extra], capsys)
    assert code == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert re.search(message, err), err
    assert not out.exists() and not (out.parent.exists() and any(out.parent.iterdir())), "something was written"


def test_wrong_tokenizer(tmp_path: Path, tiny_texts: list[str], capsys: pytest.CaptureFixture) -> None:
    small = tmp_path / "tok.json"
    train_bpe(tiny_texts, vocab_size=300).save(small)
    out = tmp_path / "out"
    code, err = _run([str(FIXTURES / "calm_bin"), "--out", str(out), "--tokenizer", str(small)], capsys)
    assert code == 2 and "has 300 tokens but the calm embeds 320" in err and not out.exists()


def test_existing_output_needs_overwrite(tmp_path: Path, tokenizer_json: str, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = [str(FIXTURES / "autoencoder_bin"), "--out", str(out), "--tokenizer", tokenizer_json]
    code, err = _run(args, capsys)
    assert code == 2 and "already exists; pass --overwrite" in err and (out / "keep.txt").exists()
    assert _run([*args, "--overwrite"], capsys)[0] == 0 and not (out / "keep.txt").exists()


def test_not_a_folder(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = _run([str(tmp_path / "nowhere"), "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "is not a folder" in err and "hf:cccczshao/CALM-M" in err


def test_hub_without_huggingface_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails as if not installed
    code, err = _run(["hf:cccczshao/CALM-M", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "pip install 'calm-lm[hub]'" in err
    assert "https://huggingface.co/cccczshao/CALM-M/tree/main" in err and not (tmp_path / "out").exists()


def test_hub_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """Offline with an empty cache: no network is touched, the error says how to download by hand."""
    pytest.importorskip("huggingface_hub")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    code, err = _run(["hf:cccczshao/CALM-M@abc123", "--out", str(tmp_path / "out")], capsys)
    assert code == 2 and "could not fetch cccczshao/CALM-M@abc123 from the Hugging Face hub" in err
    assert "https://huggingface.co/cccczshao/CALM-M/tree/abc123" in err and not (tmp_path / "out").exists()
