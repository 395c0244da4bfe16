"""``load_model`` builds on the meta device: no random initialisation, the same model as building
and loading the ordinary way, tables no checkpoint holds recomputed, and ``dtype`` casting on read."""

from __future__ import annotations

from pathlib import Path

import factories
import pytest
import torch

from calm import checkpoint
from calm.checkpoint import build_model, load_model, load_state_into, load_weights, read_config, save_checkpoint
from calm.data.tokenizer import Tokenizer


def _reference(ckpt: Path) -> torch.nn.Module:
    """The loading path before the meta device: a randomly initialised model, then a copy of the weights."""
    model = build_model(read_config(ckpt))
    load_state_into(model, load_weights(ckpt), ckpt)
    return model.eval()


def _save(model: torch.nn.Module, kind: str, path: Path, tokenizer: Tokenizer) -> Path:
    config = {"kind": kind, "model": vars(model.config).copy(), "tokenizer_sha256": tokenizer.sha256}
    if kind == "calm":
        config["autoencoder"] = vars(model.autoencoder.config).copy()
    return save_checkpoint(path, model=model, config=config, tokenizer_json=tokenizer.to_str())


@pytest.fixture(scope="module")
def checkpoints(tiny_lm_checkpoints, tiny_tokenizer, tmp_path_factory) -> dict[str, Path]:
    """The tiny autoencoder, CALM and GPT runs, plus CALMs with a flow and a diffusion head (whose noise
    schedule is a buffer no checkpoint holds)."""
    root = tmp_path_factory.mktemp("heads")
    found = {k: tiny_lm_checkpoints[k] for k in ("ae", "calm", "gpt")}
    for head in ("flow", "diffusion"):
        model = factories.tiny_calm(vocab=tiny_tokenizer.vocab_size, head=head, head_std=0.02)
        found[head] = _save(model, "calm", root / head, tiny_tokenizer)
    return found


@pytest.mark.parametrize("name", ["ae", "calm", "gpt", "flow", "diffusion"])
def test_meta_loading_gives_the_model_of_ordinary_loading(checkpoints, name) -> None:
    model, _, _ = load_model(checkpoints[name])
    reference = _reference(checkpoints[name])
    ours, theirs = model.state_dict(keep_vars=True), reference.state_dict(keep_vars=True)
    assert list(ours) == list(theirs)
    for key in ours:
        assert torch.equal(ours[key], theirs[key]) and ours[key].requires_grad == theirs[key].requires_grad, key
    ours_buffers, their_buffers = dict(model.named_buffers()), dict(reference.named_buffers())
    assert list(ours_buffers) == list(their_buffers)
    for key, value in ours_buffers.items():  # the rotary tables and noise schedule are recomputed
        assert not value.is_meta and torch.equal(value, their_buffers[key]), key
    ids = torch.randint(3, 40, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        if name == "ae":
            assert torch.equal(model.decode_ids(model.encode(ids.view(-1, 4))[0]),
                               reference.decode_ids(reference.encode(ids.view(-1, 4))[0]))  # fmt: skip
        elif name == "gpt":
            assert torch.equal(model(ids), reference(ids))
        else:
            h, h_ref = model.hidden_states(ids.view(2, 4, 4)), reference.hidden_states(ids.view(2, 4, 4))
            assert torch.equal(h, h_ref)
            draws = model.sample_next(h[:, -1], 3, torch.Generator().manual_seed(1)).latents
            assert torch.equal(draws, reference.sample_next(h_ref[:, -1], 3, torch.Generator().manual_seed(1)).latents)


def test_loading_draws_no_random_weights(checkpoints, monkeypatch) -> None:
    """The model is built on the meta device: initialisers run on meta tensors, never on memory."""
    calls: list[torch.Tensor] = []
    real = torch.nn.init.normal_

    def spy(tensor, *args, **kwargs):
        calls.append(tensor)
        return real(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "normal_", spy)
    load_model(checkpoints["calm"])
    assert all(t.is_meta for t in calls)


@pytest.mark.parametrize("chunk_bytes", [256 * 2**20, 4096])
def test_a_bf16_load_casts_the_weights_as_it_reads_them(checkpoints, chunk_bytes, monkeypatch) -> None:
    """Whole file at once or a few tensors per mapping: the same weights."""
    monkeypatch.setattr(checkpoint, "CAST_CHUNK_BYTES", chunk_bytes)
    model, _, _ = load_model(checkpoints["calm"], dtype=torch.bfloat16)
    reference = _reference(checkpoints["calm"])
    theirs = reference.state_dict()
    for key, value in model.state_dict().items():
        assert value.dtype == torch.bfloat16 and torch.equal(value, theirs[key].to(torch.bfloat16)), key
    assert model.backbone.rope_cos.dtype == torch.float32  # recomputed tables keep their own precision
