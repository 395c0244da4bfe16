"""Training loop and checkpoints: save/load bit-identical, exact resume, guards, clear errors."""

import json
import shutil

import factories
import pytest
import torch

from calm import checkpoint as ckpt
from calm.config import ConfigError, TrainConfig
from calm.train.loop import NonFiniteError, ResumeChangesError, run_training
from calm.train.stages import AutoencoderStage, CALMStage, GPTStage


def train_config(**kw) -> TrainConfig:
    """8 steps of 256 tokens with a cosine schedule, evaluated and saved every 4."""
    steps = dict(batch_tokens=256, max_steps=8, eval_every=4, save_every=4, eval_tokens=256)
    return factories.train_config(warmup_steps=2, lr_schedule="cosine", **{**steps, **kw})


def train_ae(data_dir, out, resume=False, **kw):
    torch.manual_seed(0)
    stage = AutoencoderStage(data_dir, factories.autoencoder_config(), train_config(**kw))
    return stage, run_training(stage, stage.train_config, out, progress=False, resume=resume)


def losses(run_dir):
    return [
        r["loss"]
        for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())
        if r["split"] == "train"
    ]


@pytest.fixture(scope="module")
def ae_run(tiny_data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ae") / "run"
    stage, _ = train_ae(tiny_data_dir, out)
    return stage, out


def test_checkpoint_layout_and_bit_identical_reload(ae_run):
    stage, out = ae_run
    path = ckpt.resolve_checkpoint(out)
    assert path.name == "step_00000008"
    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "training_state.json",
        "training_state.safetensors",
    ):
        assert (path / name).exists(), name
    model, tok, config = ckpt.load_model(out, kind="autoencoder")
    ids = torch.randint(0, tok.vocab_size, (5, 4))
    stage.model.eval()
    assert torch.equal(model.decode(model.encode(ids)[0]), stage.model.decode(stage.model.encode(ids)[0]))
    assert config["tokenizer_sha256"] == tok.sha256
    # no pickle: the training state is JSON + safetensors
    assert not list(path.glob("*.pt")) and not list(path.glob("*.bin"))


def test_resume_continues_the_same_run(tiny_data_dir, tmp_path, ae_run):
    _, unbroken = ae_run
    broken = tmp_path / "broken"
    train_ae(tiny_data_dir, broken, max_steps=8, save_every=4)
    # simulate a crash after step 4: drop the later checkpoint and the log lines after it
    shutil.rmtree(ckpt.checkpoint_step_dir(broken, 8))
    train_ae(tiny_data_dir, broken, resume=True)
    assert losses(broken) == losses(unbroken)
    a = ckpt.load_weights(unbroken)
    b = ckpt.load_weights(broken)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_refuses_a_damaged_metrics_line_naming_it(tiny_data_dir, tmp_path, ae_run):
    """A torn last line is what a crash leaves (dropped on resume); a damaged line before it is not,
    and resuming would silently lose records: the resume stops, naming file:line, and changes nothing."""
    from calm.io import JSONFileError

    _, out = ae_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    metrics = run / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[2] = lines[2][:-1]
    metrics.write_text("\n".join(lines) + "\n")
    with pytest.raises(JSONFileError, match=f"{metrics}:3 is not valid JSON"):
        train_ae(tiny_data_dir, run, resume=True)
    assert metrics.read_text() == "\n".join(lines) + "\n"


def test_resume_refuses_a_changed_learning_rate_unless_allowed_and_records_it(tiny_data_dir, tmp_path, ae_run):
    _, out = ae_run
    run = tmp_path / "run"
    shutil.copytree(out, run)
    shutil.rmtree(ckpt.checkpoint_step_dir(run, 8))  # stopped after step 4
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    with pytest.raises(
        ResumeChangesError, match=r"from step 4 on \(train\.lr 0\.003 -> 0\.01, train\.seed 1 -> 7\).*--allow-changes"
    ):
        train_ae(tiny_data_dir, run, resume=True, lr=1e-2, seed=7)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing touched
    torch.manual_seed(0)
    stage = AutoencoderStage(tiny_data_dir, factories.autoencoder_config(), train_config(lr=1e-2, max_steps=6))
    run_training(stage, stage.train_config, run, progress=False, resume=True, allow_changes=True)
    recorded = json.loads((run / "run_config.json").read_text())
    assert recorded["train"]["lr"] == 1e-2
    assert recorded["train_changes"] == [{"step": 4, "field": "lr", "from": 3e-3, "to": 1e-2}]  # max_steps: not one
    assert losses(run)[:1] == losses(out)[:1] and losses(run)[-1] != losses(out)[5]  # the same start, then lr 1e-2
    stage = AutoencoderStage(tiny_data_dir, factories.autoencoder_config(), train_config(lr=1e-2, max_steps=8))
    run_training(stage, stage.train_config, run, progress=False, resume=True)  # same options as the checkpoint
    assert json.loads((run / "run_config.json").read_text())["train_changes"] == recorded["train_changes"]  # kept


def test_existing_run_dir_is_not_overwritten(tiny_data_dir, ae_run):
    _, out = ae_run
    before = sorted(p.name for p in (out / "checkpoints").iterdir())
    with pytest.raises(ConfigError, match="--resume"):
        train_ae(tiny_data_dir, out)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == before


def test_truncated_weights_are_reported(ae_run, tmp_path):
    _, out = ae_run
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt.resolve_checkpoint(out), copy)
    weights = copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ckpt.CheckpointError, match="truncated"):
        ckpt.load_model(copy)


def test_replaced_tokenizer_is_reported(ae_run, tmp_path):
    from calm.data.tokenizer import train_bpe

    _, out = ae_run
    copy = tmp_path / "ckpt"
    shutil.copytree(ckpt.resolve_checkpoint(out), copy)
    other = train_bpe(["completely different text " * 20, "more words here"], vocab_size=280)
    (copy / "tokenizer.json").write_text(other.to_str())
    config = json.loads((copy / "config.json").read_text())
    config["files"].pop("tokenizer.json")  # size check off: exercise the sha256 check itself
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(ckpt.CheckpointError, match="tokenizer"):
        ckpt.load_model(copy)


def test_nonfinite_loss_stops_with_step_and_stage(tiny_data_dir, tmp_path, monkeypatch):
    stage = AutoencoderStage(tiny_data_dir, factories.autoencoder_config(), train_config(max_steps=6, save_every=2))
    real = stage.loss
    calls = {"n": 0}

    def bad_loss(model, batch):
        calls["n"] += 1
        loss, m = real(model, batch)
        if calls["n"] == 3:
            loss = loss * float("nan")
            m = {**m, "loss": loss.detach()}
        return loss, m

    stage.loss = bad_loss
    with pytest.raises(NonFiniteError, match="step 3 of stage autoencoder"):
        run_training(stage, stage.train_config, tmp_path / "run", progress=False)
    assert ckpt.resolve_checkpoint(tmp_path / "run").name == "step_00000002"  # last good one kept


def test_calm_and_gpt_stages_train_and_reload(tiny_data_dir, ae_run, tmp_path):
    _, ae_dir = ae_run
    torch.manual_seed(0)
    stage = CALMStage(tiny_data_dir, factories.calm_config(), train_config(max_steps=4, batch_tokens=64), ae_dir)
    run_training(stage, stage.train_config, tmp_path / "calm", progress=False)
    model, tok, config = ckpt.load_model(tmp_path / "calm", kind="calm")
    assert config["autoencoder"]["chunk_size"] == 4  # the autoencoder travels inside the checkpoint
    ae, _, _ = ckpt.load_model(ae_dir)
    assert torch.equal(model.autoencoder.embed_tokens.weight, ae.embed_tokens.weight)  # frozen: unchanged
    records = [json.loads(x) for x in (tmp_path / "calm" / "metrics.jsonl").read_text().splitlines()]
    assert any("brierlm" in r for r in records if r["split"] == "val")

    gstage = GPTStage(tiny_data_dir, factories.gpt_config(), train_config(max_steps=4, batch_tokens=64, block_size=16))
    run_training(gstage, gstage.train_config, tmp_path / "gpt", progress=False)
    records = [json.loads(x) for x in (tmp_path / "gpt" / "metrics.jsonl").read_text().splitlines()]
    assert {"brierlm", "perplexity"} <= set(next(r for r in records if r["split"] == "val"))
    ckpt.load_model(tmp_path / "gpt", kind="gpt")


def test_calm_refuses_an_autoencoder_with_another_tokenizer(tiny_data_dir, ae_run, tmp_path):
    from calm.data.prepare import prepare

    _, ae_dir = ae_run
    other = tmp_path / "other"
    texts = tmp_path / "t.txt"
    texts.write_text("entirely other words for another tokenizer " * 200)
    prepare(other, [str(texts)], tokenizer="train", vocab_size=300, val_fraction=0.0, progress=False)
    cfg = factories.calm_config(num_samples=8, num_target_samples=100)  # N and M: the config's defaults
    with pytest.raises((ConfigError, ValueError), match="tokenizer"):
        CALMStage(other, cfg, train_config(), ae_dir)
