"""Shared fixtures: a tiny corpus, a tiny trained tokenizer and a tiny prepared data folder.

Everything is built once per test session from a few KB of generated text, in a temporary folder,
so tests that need real token shards cost milliseconds.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from calm.config import TrainConfig
from calm.data.prepare import prepare
from calm.data.tokenizer import Tokenizer, train_bpe

_SUBJECTS = ["The river", "A small bird", "Robert Boulter", "The 1933 hurricane", "Du Fu", "The orchestra"]
_VERBS = ["crossed", "described", "sang about", "destroyed", "followed", "wrote to"]
_OBJECTS = ["the old bridge", "a quiet valley", "1 @,@ 000 people", "the well @-@ known poet", "its audience"]
_EXTRAS = ["naïve café", "東京 と 京都", "emoji 😀🎉", "tab\tseparated", "line\r\nbreak", "  leading spaces"]


def make_texts(num_docs: int = 48, seed: int = 0) -> list[str]:
    """Deterministic little documents (a few KB in all) with some unicode and odd whitespace."""
    rng = random.Random(seed)
    docs = []
    for i in range(num_docs):
        sentences = []
        for _ in range(rng.randrange(2, 6)):
            year = rng.randrange(1800, 2000)
            sentences.append(f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} in {year} .")
        if i % 5 == 0:
            sentences.append(rng.choice(_EXTRAS))
        docs.append(f" = Document {i} = \n \n " + " ".join(sentences) + " \n")
    return docs


@pytest.fixture(scope="session")
def tiny_texts() -> list[str]:
    return make_texts()


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory, tiny_texts: list[str]) -> Path:
    """A folder with the tiny texts: half as one .jsonl, half as .txt files (one document each)."""
    root = tmp_path_factory.mktemp("tiny_corpus")
    half = len(tiny_texts) // 2
    with open(root / "a.jsonl", "w", encoding="utf-8") as f:
        for text in tiny_texts[:half]:
            f.write(json.dumps({"text": text}) + "\n")
    sub = root / "texts"
    sub.mkdir()
    for i, text in enumerate(tiny_texts[half:]):
        (sub / f"{i:03d}.txt").write_bytes(text.encode("utf-8"))
    return root


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_texts: list[str]) -> Tokenizer:
    return train_bpe(tiny_texts, vocab_size=320)


@pytest.fixture(scope="session")
def tiny_data_dir(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path) -> Path:
    """``prepare`` output for the tiny corpus: a 320-entry BPE, 20% of documents held out by hash
    (``min_val_bytes=0``: no top-up, so each document's split is ``split_of`` of its text)."""
    out = tmp_path_factory.mktemp("tiny_data") / "data"
    prepare(
        out, [str(tiny_corpus)], tokenizer="train", vocab_size=320, val_fraction=0.2, min_val_bytes=0, progress=False
    )
    return out


@pytest.fixture(autouse=True, scope="session")
def _one_thread_per_test_process() -> None:
    """Tiny models gain nothing from intra-op threads, and OpenMP threads spinning on a shared 2-core
    machine made a 2-step GPT run take 10 s instead of 0.1 s (measured)."""
    torch.set_num_threads(1)


@pytest.fixture(scope="module")
def data_dir(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A private copy of the tiny data for one test module: the stages write caches into their data
    folder, and a test of ``prepare``'s output must not see them."""
    return Path(shutil.copytree(tiny_data_dir, tmp_path_factory.mktemp("data") / "data"))


@pytest.fixture(scope="session")
def tiny_lm_checkpoints(tiny_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Run directories of a tiny autoencoder, CALM (K = 4, 16 steps) and GPT (32 tokens), 2 steps each
    (the sizes of ``factories.TINY_AE``, ``TINY_CALM`` and ``TINY_GPT``).

    Barely trained: for tests of serving and evaluation plumbing, not of quality.
    """
    import factories

    from calm.train.loop import run_training
    from calm.train.stages import AutoencoderStage, CALMStage, GPTStage

    def train_config(**kw: object) -> TrainConfig:
        return factories.train_config(warmup_steps=1, lr_schedule="cosine", **kw)

    root = tmp_path_factory.mktemp("tiny_lms")
    runs = {kind: root / kind for kind in ("ae", "calm", "gpt")}
    torch.manual_seed(0)
    stage = AutoencoderStage(tiny_data_dir, factories.autoencoder_config(), train_config())
    run_training(stage, stage.train_config, runs["ae"], progress=False)
    stage = CALMStage(tiny_data_dir, factories.calm_config(), train_config(), runs["ae"])
    run_training(stage, stage.train_config, runs["calm"], progress=False)
    stage = GPTStage(tiny_data_dir, factories.gpt_config(), train_config(block_size=16))
    run_training(stage, stage.train_config, runs["gpt"], progress=False)
    return runs
