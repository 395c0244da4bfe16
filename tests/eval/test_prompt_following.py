"""Prompt retrieval AUC (calm.eval.prompt_following): known answers and the end-to-end path."""

from __future__ import annotations

import numpy as np
import pytest

from calm.eval.prompt_following import prompt_set, retrieval_auc, retrieval_scores, unigram

V = 50


def _background() -> np.ndarray:
    return unigram(np.arange(V).repeat(10), V)


def test_copying_the_prompt_is_retrieved_and_ignoring_it_is_chance():
    rng = np.random.default_rng(0)
    prompts = [rng.choice(V, size=12, replace=False).tolist() for _ in range(20)]
    bg = _background()
    auc, se, per_row = retrieval_auc(retrieval_scores(prompts, [p[:6] for p in prompts], bg))
    assert auc > 0.95 and per_row.min() > 0.5 and se < 0.05
    same = [[1, 2, 3]] * 20  # one continuation for every prompt: its ranks average to exactly one half
    auc, _, per_row = retrieval_auc(retrieval_scores(prompts, same, bg))
    assert auc == pytest.approx(0.5) and per_row.std() > 0.1
    shifted = [prompts[(i + 1) % 20][:6] for i in range(20)]  # each copies the next prompt
    scores = retrieval_scores(prompts, shifted, bg)
    assert scores.argmax(axis=1).tolist() == [(i + 1) % 20 for i in range(20)]
    assert retrieval_auc(scores)[0] < 0.6


def test_empty_continuation_scores_one_half():
    scores = retrieval_scores([[1, 2], [3, 4], [5, 6]], [[], [3], [5, 5]], _background())
    _, _, per_row = retrieval_auc(scores)
    assert per_row.tolist() == [0.5, 1.0, 1.0]


def test_rare_shared_tokens_count_more_than_frequent_ones():
    counts = np.full(V, 1000)
    counts[7] = 1  # token 7 is rare, token 3 frequent
    bg = unigram(np.repeat(np.arange(V), counts), V)
    s = retrieval_scores([[7, 9], [3, 9]], [[7], [3]], bg)
    assert s[0, 0] - s[0, 1] > s[1, 1] - s[1, 0] > 0


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="out of range"):
        retrieval_scores([[1], [V]], [[1], [2]], _background())
    with pytest.raises(ValueError, match="2 prompts but 1"):
        retrieval_scores([[1], [2]], [[1]], _background())
    with pytest.raises(ValueError, match="square"):
        retrieval_auc(np.zeros((1, 1)))


class _Shard:
    def __init__(self, lengths: list[int]) -> None:
        self.docs = [np.array([0] + list(range(2, 2 + n))) for n in lengths]

    def __len__(self) -> int:
        return len(self.docs)

    def document(self, i: int) -> np.ndarray:
        return self.docs[i]


def test_prompt_set_skips_short_documents_and_spreads_picks():
    shard = _Shard([5, 20, 3, 20, 20, 20])
    ps = prompt_set(shard, 2, prompt_tokens=8, new_tokens=4, bos_id=0)
    assert ps.documents == [1, 5]
    assert ps.prompts[0] == list(range(2, 10)) and ps.references[0] == list(range(10, 14))
    assert prompt_set(shard, 100, 8, 4, 0).documents == [1, 3, 4, 5]
    with pytest.raises(ValueError, match="at least 40 tokens"):
        prompt_set(shard, 4, 30, 10, 0)


def test_end_to_end_on_tiny_checkpoints(tiny_lm_checkpoints, tiny_data_dir):
    from calm.checkpoint import load_model
    from calm.eval.prompt_following import prompt_following

    calm_model, tok, _ = load_model(tiny_lm_checkpoints["calm"], kind="calm")
    gpt_model, _, _ = load_model(tiny_lm_checkpoints["gpt"], kind="gpt")
    models = {"calm": calm_model, "gpt": gpt_model}
    out = prompt_following(models, tok, tiny_data_dir, num_prompts=4, prompt_tokens=8, new_tokens=8, num_samples=8)
    assert set(out["results"]) == {"reference", "calm", "gpt"}
    assert out["settings"]["prompts"] >= 2
    for r in out["results"].values():
        assert 0.0 <= r["auc"] <= 1.0 and r["auc_se"] >= 0.0 and 0 <= r["mean_new_tokens"] <= 8
    assert out["results"]["reference"]["mean_new_tokens"] == 8
    assert len(out["examples"]) >= 2 and {"prompt", "reference", "calm", "gpt"} <= set(out["examples"][0])


def test_calm_follow_command_writes_json_and_refuses_bad_input(tiny_lm_checkpoints, tiny_data_dir, tmp_path, capsys):
    import json

    from calm.cli import main

    runs = [str(tiny_lm_checkpoints["calm"]), str(tiny_lm_checkpoints["gpt"])]
    small = ["--num-prompts", "4", "--prompt-tokens", "8", "--new-tokens", "8", "--num-samples", "8"]
    out = tmp_path / "follow.json"
    assert main(["follow", "--checkpoint", *runs, "--data", str(tiny_data_dir), *small, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "real text" in printed and "calm" in printed and "gpt" in printed
    assert set(json.loads(out.read_text())["results"]) == {"reference", "calm", "gpt"}
    long = ["--prompt-tokens", "100000"]
    assert main(["follow", "--checkpoint", runs[0], "--data", str(tiny_data_dir), *long]) == 2
    assert "document(s) of at least" in capsys.readouterr().err
    hot = ["--temperature", "1.5"]  # CALM samples at T in (0, 1] only
    assert main(["follow", "--checkpoint", runs[0], "--data", str(tiny_data_dir), *small, *hot]) == 2
    assert "temperature" in capsys.readouterr().err
