"""Distributed training on CPU with gloo: 2 ranks match 1 rank at the same global batch.

Two worker processes are started the way ``torchrun`` starts them (RANK, WORLD_SIZE, MASTER_ADDR,
MASTER_PORT in the environment; ``python tests/train/test_distributed.py`` is the worker entry point), and
each trains the autoencoder, CALM and the GPT baseline for 20 steps under DDP and then under FSDP2.
The reference is one process with two accumulation steps of the same micro-batch size: the same
items in the same order and, because each micro-batch's noise is seeded by its position in the
global batch (``calm.train.loop.micro_batch_seed``), the same noise. The losses agree within 1e-5.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import factories
import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
STEPS = 20
KINDS = ("autoencoder", "calm", "gpt")
TOLERANCE = 1e-5


def _train_config(kind: str, world_size: int):
    """20 steps, each of two micro-batches (one per rank, or two accumulation steps on one)."""
    block, batch = {"autoencoder": (32, 64), "calm": (32, 128), "gpt": (16, 64)}[kind]
    steps = dict(batch_tokens=batch, micro_batch_tokens=batch // 2, block_size=block, max_steps=STEPS)
    return factories.train_config(
        warmup_steps=2, lr_schedule="cosine", eval_every=STEPS, save_every=10, seed=3, **steps
    )


def _stage(kind: str, data_dir: Path, ae_dir: Path, world_size: int = 1):
    from calm.train.stages import AutoencoderStage, CALMStage, GPTStage

    torch.manual_seed(0)  # the same initial weights in every process
    cfg = _train_config(kind, world_size)
    if kind == "autoencoder":
        return AutoencoderStage(data_dir, factories.autoencoder_config(), cfg)
    if kind == "calm":
        return CALMStage(data_dir, factories.calm_config(), cfg, ae_dir)
    return GPTStage(data_dir, factories.gpt_config(), cfg)


def _losses(run: Path) -> list[float]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["split"] == "train"]


def _worker(data_dir: Path, ae_dir: Path, out: Path) -> None:
    """One rank: every stage under DDP, then under FSDP2, then an FSDP2 resume from step 10."""
    from calm import checkpoint as ckpt
    from calm.train import distributed
    from calm.train.loop import run_training

    for strategy in ("ddp", "fsdp"):
        distributed.set_strategy(strategy)
        for kind in KINDS:
            stage = _stage(kind, data_dir, ae_dir, world_size=2)
            run_training(stage, stage.train_config, out / strategy / kind, progress=False)
            _check_wrapping(stage.model, strategy)
    # resume the sharded CALM run from its step-10 checkpoint: the optimizer state is re-sharded
    broken = out / "fsdp-resumed"
    if distributed.is_main():
        shutil.copytree(out / "fsdp" / "calm", broken)
        shutil.rmtree(ckpt.checkpoint_step_dir(broken, STEPS))
    distributed.barrier()
    stage = _stage("calm", data_dir, ae_dir, world_size=2)
    run_training(stage, stage.train_config, broken, progress=False, resume=True)


def _check_wrapping(model: torch.nn.Module, strategy: str) -> None:
    """The frozen autoencoder stays outside the wrapper; FSDP2 sharded every trainable weight."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    if strategy == "ddp":
        assert set(getattr(model, "_ddp_params_and_buffers_to_ignore", [])) == frozen
    else:
        assert isinstance(model, FSDPModule)
        for name, p in model.named_parameters():
            assert isinstance(p, DTensor) == (name not in frozen), name


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ae_dir(data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An (untrained) autoencoder checkpoint for CALM: enough to exercise the frozen-AE path."""
    from dataclasses import asdict

    from calm import checkpoint as ckpt
    from calm.data.tokenizer import Tokenizer

    tok = Tokenizer.from_file(data_dir / "tokenizer.json")
    model = factories.tiny_autoencoder(vocab=tok.vocab_size, seed=1)
    path = tmp_path_factory.mktemp("ae") / "ae"
    ckpt.save_checkpoint(
        path,
        model=model,
        config={"kind": "autoencoder", "model": asdict(model.config), "tokenizer_sha256": tok.sha256},
        tokenizer_json=tok.to_str(),
    )
    return path


@pytest.fixture(scope="module")
def two_rank_runs(data_dir: Path, ae_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("dist")
    env = {
        **os.environ,
        "WORLD_SIZE": "2",
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(_free_port()),
        "OMP_NUM_THREADS": "1",
        # the repository (calm) and tests/ (factories), both on sys.path under pytest too
        "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH", "")]),
    }
    logs = [out / f"rank{rank}.log" for rank in range(2)]
    procs = []
    for rank, log in enumerate(logs):
        with open(log, "w") as f:
            procs.append(
                subprocess.Popen(
                    [sys.executable, __file__, str(data_dir), str(ae_dir), str(out)],
                    env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                    stdout=f,
                    stderr=subprocess.STDOUT,
                )
            )
    deadline = time.monotonic() + 300
    while any(p.poll() is None for p in procs):
        if any(p.returncode not in (None, 0) for p in procs) or time.monotonic() > deadline:
            for p in procs:  # one rank failed: the other would wait in a collective forever
                p.kill()
        time.sleep(0.05)
    for p, log in zip(procs, logs):
        assert p.returncode == 0, log.read_text()[-3000:]
    return out


@pytest.fixture(scope="module")
def one_rank_runs(data_dir: Path, ae_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from calm.train.loop import run_training

    out = tmp_path_factory.mktemp("single")
    for kind in KINDS:  # on one thread, as in the workers: the same kernels, the same summation order
        stage = _stage(kind, data_dir, ae_dir)
        run_training(stage, stage.train_config, out / kind, progress=False)
    return out


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
@pytest.mark.parametrize("kind", KINDS)
def test_two_ranks_match_one_rank(two_rank_runs: Path, one_rank_runs: Path, strategy: str, kind: str) -> None:
    single = _losses(one_rank_runs / kind)
    double = _losses(two_rank_runs / strategy / kind)
    assert len(single) == len(double) == STEPS
    diff = float(np.max(np.abs(np.array(single) - np.array(double))))
    print(f"{strategy} {kind}: max |loss(1 rank) - loss(2 ranks)| over {STEPS} steps = {diff:.2e}")
    assert diff <= TOLERANCE, (single, double)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_distributed_checkpoints_are_whole_and_match(two_rank_runs: Path, one_rank_runs: Path, strategy: str) -> None:
    """Rank 0 writes the usual single-directory checkpoint (FSDP gathers it), no ``module.`` prefix,
    the frozen autoencoder included and unchanged; the weights match the 1-rank run's."""
    from calm import checkpoint as ckpt

    model, _, config = ckpt.load_model(two_rank_runs / strategy / "calm", kind="calm")
    assert config["step"] == STEPS
    single = ckpt.load_weights(one_rank_runs / "calm")
    double = ckpt.load_weights(two_rank_runs / strategy / "calm")
    assert set(single) == set(double)
    assert all(torch.allclose(single[k], double[k], atol=1e-5) for k in single)
    assert all(torch.equal(single[k], double[k]) for k in single if k.startswith("autoencoder."))
    state = json.loads((ckpt.resolve_checkpoint(two_rank_runs / strategy / "calm") / "training_state.json").read_text())
    assert state["world_size"] == 2


def test_fsdp_resume_is_exact(two_rank_runs: Path) -> None:
    """Resuming a sharded run re-shards weights and optimizer moments: the same losses and weights."""
    from calm import checkpoint as ckpt

    assert _losses(two_rank_runs / "fsdp-resumed") == _losses(two_rank_runs / "fsdp" / "calm")
    a, b = (
        ckpt.load_weights(two_rank_runs / "fsdp" / "calm"),
        ckpt.load_weights(two_rank_runs / "fsdp-resumed"),
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sampler_shards_without_overlap_or_gap() -> None:
    """Over an epoch, the ranks' items are disjoint and, slot by slot, those of a single rank."""
    from calm.data.shards import BatchSampler

    one = BatchSampler(101, 6, seed=5)
    two = [BatchSampler(101, 3, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(2 * one.batches_per_epoch()):  # crosses an epoch boundary
        a, b = (s.next_indices() for s in two)
        assert not set(a) & set(b)
        assert np.array_equal(np.concatenate([a, b]), one.next_indices())


# ----------------------------------------------------------------------------- exact resume


def _records(run: Path) -> list[dict]:
    """Every metrics record without the timing fields (grad_norm is logged at full precision)."""
    timing = ("elapsed_s", "tokens_per_s")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(line).items() if k not in timing} for line in lines]


@pytest.mark.parametrize("kind", KINDS)
def test_resume_after_a_crash_is_bit_identical(
    one_rank_runs: Path, data_dir: Path, ae_dir: Path, tmp_path: Path, kind: str
) -> None:
    """A run that died after its step-10 checkpoint, half-way through writing step 20's checkpoint and
    a metrics line, resumes to the same log and the same weights as the unbroken run."""
    from calm import checkpoint as ckpt
    from calm.train.loop import run_training

    unbroken, broken = one_rank_runs / kind, tmp_path / kind
    shutil.copytree(unbroken, broken)
    final = ckpt.checkpoint_step_dir(broken, STEPS)
    final.rename(final.parent / f".{final.name}.tmp-crashed")  # an interrupted write
    (final.parent / f".{final.name}.tmp-crashed" / "config.json").unlink()
    with open(broken / "metrics.jsonl", "a") as f:
        f.write('{"step": 21, "split": "tra')  # an append cut short
    assert [p.name for p in ckpt.list_checkpoints(broken)] == ["step_00000010"]
    stage = _stage(kind, data_dir, ae_dir)
    with pytest.warns(UserWarning, match=f"{broken / 'metrics.jsonl'}: skipped its last line"):
        run_training(stage, stage.train_config, broken, progress=False, resume=True)
    assert _records(broken) == _records(unbroken)
    a, b = ckpt.load_weights(unbroken), ckpt.load_weights(broken)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not [p.name for p in (broken / "checkpoints").iterdir() if p.name.startswith(".")]


def test_a_checkpoint_moved_aside_during_a_replace_is_restored(one_rank_runs: Path, tmp_path: Path) -> None:
    """``save_checkpoint`` replacing an existing directory first moves it to ``.NAME.old-*``; a crash
    between the two renames must not lose it."""
    from calm import checkpoint as ckpt

    run = tmp_path / "run"
    shutil.copytree(one_rank_runs / "gpt", run)
    final = ckpt.checkpoint_step_dir(run, STEPS)
    final.rename(final.parent / f".{final.name}.old-1234")
    assert ckpt.list_checkpoints(run)[-1].name == "step_00000010"
    ckpt.clean_incomplete(run)
    assert ckpt.list_checkpoints(run)[-1] == final
    ckpt.read_config(final)


@pytest.mark.parametrize("signame", ["SIGTERM", "SIGINT"])
def test_a_stop_signal_saves_a_final_checkpoint_and_exits(
    signame: str, data_dir: Path, ae_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """SIGTERM and a first Ctrl-C (SIGINT) finish the current step, save it and exit."""
    import signal

    from calm import checkpoint as ckpt
    from calm.train.loop import run_training

    sig = getattr(signal, signame)
    before = signal.getsignal(sig)
    stage = _stage("gpt", data_dir, ae_dir)
    real, calls = stage.loss, {"n": 0}

    def loss_then_signal(model, batch):
        calls["n"] += 1
        if calls["n"] == 7:  # step 4's first micro-batch (two per step)
            os.kill(os.getpid(), sig)
        return real(model, batch)

    stage.loss = loss_then_signal
    with pytest.raises(SystemExit, match="stopped by signal at step 4; checkpoint saved"):
        run_training(stage, stage.train_config, tmp_path / "run", progress=False)
    assert ckpt.resolve_checkpoint(tmp_path / "run").name == "step_00000004"
    assert signal.getsignal(sig) is before  # the handler is removed again
    if signame == "SIGINT":
        assert "Ctrl-C again to quit at once" in capsys.readouterr().err


def test_a_second_ctrl_c_stops_at_once(data_dir: Path, ae_dir: Path, tmp_path: Path) -> None:
    import signal

    from calm import checkpoint as ckpt
    from calm.train.loop import run_training

    stage = _stage("gpt", data_dir, ae_dir)
    real, calls = stage.loss, {"n": 0}

    def loss_then_two_interrupts(model, batch):
        calls["n"] += 1
        if calls["n"] == 7:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(model, batch)

    stage.loss = loss_then_two_interrupts
    with pytest.raises(KeyboardInterrupt):
        run_training(stage, stage.train_config, tmp_path / "run", progress=False)
    assert calls["n"] == 7  # not a step further
    assert ckpt.list_checkpoints(tmp_path / "run") == []  # nothing was due yet, and nothing was saved


if __name__ == "__main__":  # one rank of the 2-rank run (see ``two_rank_runs``)
    torch.set_num_threads(1)
    _worker(Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]))
    import torch.distributed as tdist

    if tdist.is_initialized():
        tdist.destroy_process_group()
