"""FLOP and parameter accounting: the paper's Table 1 (configurations of §7.1) and FlopCounterMode checks."""

import factories
import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from calm.config import AutoencoderConfig, CALMConfig, GPTConfig
from calm.models.flops import (
    PAPER_AE_TRAIN_TOKENS,
    PAPER_TABLE1,
    PAPER_TRAIN_TOKENS,
    ae_flops,
    calm_flops,
    format_flops,
    gpt_flops,
    paper_configs,
    table1,
)

# parameter counts of the paper's configurations, computed exactly (V = 128,257, AE excluded), in millions;
# Table 1 rounds them (Transformer-S 281M, CALM-M 371M, CALM-XL 1.82B)
PARAMS_M = {
    "Transformer-S": 282.0,
    "Transformer-M": 465.1,
    "Transformer-L": 847.0,
    "CALM-M": 371.7,
    "CALM-L": 735.3,
    "CALM-XL": 1829.8,
}


@pytest.mark.parametrize("name", list(PARAMS_M))
def test_parameter_counts_of_the_paper_configs(name: str) -> None:
    assert table1()[name]["params"] / 1e6 == pytest.approx(PARAMS_M[name], rel=2e-3)


def test_calm_m_parameter_breakdown() -> None:
    row = table1()["CALM-M"]
    assert row["embedding_params"] / 1e6 == pytest.approx(131.3, abs=0.1)
    assert row["backbone_params"] / 1e6 == pytest.approx(202.4, abs=0.1)
    assert row["embed_proj_params"] / 1e6 == pytest.approx(10.5, abs=0.1)
    assert row["head_params"] / 1e6 == pytest.approx(27.5, abs=0.1)
    assert ae_flops(AutoencoderConfig())["params"] / 1e6 == pytest.approx(75.8, abs=0.1)  # "~75M"


@pytest.mark.parametrize("name", list(PAPER_TABLE1))
def test_inference_flops_reproduce_table1(name: str) -> None:
    # all six rows within 5% (S: +0.5%, CALM-M: +0.2%; the worst is CALM-XL at +3.3%)
    ours = table1()[name]["inference_flops_per_token"]
    assert ours == pytest.approx(PAPER_TABLE1[name]["inference_flops_per_token"], rel=0.05)


def test_worked_examples_of_the_breakdown() -> None:
    s = gpt_flops(paper_configs()["Transformer-S"][0])
    assert s["breakdown"]["backbone_matmul"] + s["breakdown"]["lm_head"] == pytest.approx(367e6, rel=5e-3)
    assert s["breakdown"]["attention"] == pytest.approx(75.5e6, rel=5e-3)
    m = calm_flops(*paper_configs()["CALM-M"])["breakdown"]["inference_per_step"]
    expected = {
        "backbone_matmul": 405e6,
        "attention": 134e6,
        "embed_proj": 21e6,
        "head": 55e6,
        "ae_decoder": 547e6,
    }
    for key, value in expected.items():
        assert m[key] == pytest.approx(value, rel=0.01), key
    # the decoder is ~47% of CALM-M inference
    assert m["ae_decoder"] / sum(m.values()) == pytest.approx(0.47, abs=0.01)
    # the worked training example, (3 x 0.93 GFLOP + 0.02) / 4, is the causal-attention convention
    causal = calm_flops(*paper_configs()["CALM-M"], attention="causal")
    assert causal["train_forward_flops_per_step"] == pytest.approx(0.93e9, rel=0.01)
    assert causal["train_flops_per_token"] == pytest.approx((3 * 0.93e9 + 0.02e9) / 4, rel=0.01)


@pytest.mark.parametrize("name", ["Transformer-S", "CALM-M"])
def test_training_totals_at_524b_tokens(name: str) -> None:
    # 524B tokens (250k x 2,097,152), "full" attention: S is +5.4%, CALM-M +7.0% over Table 1
    total = table1(train_tokens=PAPER_TRAIN_TOKENS)[name]["train_flops_total"]
    assert total == pytest.approx(PAPER_TABLE1[name]["train_flops_total"], rel=0.10)


@pytest.mark.parametrize("name", ["Transformer-S", "Transformer-M", "Transformer-L"])
def test_transformer_training_totals_at_500b_tokens(name: str) -> None:
    # Table 1's Transformer rows are exactly 3 x inference x 5e11 tokens
    total = table1(train_tokens=5e11)[name]["train_flops_total"]
    assert total == pytest.approx(PAPER_TABLE1[name]["train_flops_total"], rel=0.015)


def test_headline_savings() -> None:
    # "CALM-M ... 44% fewer training FLOPs and 34% fewer inference FLOPs" than Transformer-S
    rows = table1()
    s, m = rows["Transformer-S"], rows["CALM-M"]
    assert 1 - m["train_flops_total"] / s["train_flops_total"] == pytest.approx(0.44, abs=0.03)
    assert 1 - m["inference_flops_per_token"] / s["inference_flops_per_token"] == pytest.approx(0.34, abs=0.02)


def test_training_totals_with_and_without_the_autoencoder() -> None:
    # the paper's accounting leaves stage 1 out; with it, CALM-M costs ~2% more (15.7B autoencoder tokens)
    calm, ae = paper_configs()["CALM-M"]
    paper = calm_flops(calm, ae)
    assert paper["train_flops_total_with_autoencoder"] == paper["train_flops_total"] + paper["ae_train_flops_total"]
    assert paper["ae_train_flops_total"] == ae_flops(ae)["train_flops_per_token"] * PAPER_AE_TRAIN_TOKENS
    assert 0.01 < paper["ae_train_flops_total"] / paper["train_flops_total"] < 0.05
    small = calm_flops(calm, ae, train_tokens=1e6, ae_train_tokens=2e6)
    assert small["train_flops_total"] == pytest.approx(small["train_flops_per_token"] * 1e6)
    assert small["ae_train_flops_total"] == pytest.approx(ae_flops(ae)["train_flops_per_token"] * 2e6)


def test_inference_samples_and_errors() -> None:
    calm, ae = paper_configs()["CALM-M"]
    one = calm_flops(calm, ae)
    many = calm_flops(calm, ae, num_samples_inference=200)
    per_sample = (
        (calm_flops(calm, ae, num_samples_inference=2)["inference_flops_per_token"]) - one["inference_flops_per_token"]
    )
    assert many["inference_flops_per_token"] == pytest.approx(one["inference_flops_per_token"] + 199 * per_sample)
    with pytest.raises(ValueError, match="chunk_size=8"):
        calm_flops(CALMConfig(chunk_size=8), ae)
    with pytest.raises(ValueError, match="attention"):
        gpt_flops(GPTConfig(), attention="flash")
    assert format_flops(4.424e8) == "442.4 MFLOP"
    assert format_flops(6.96e20) == "696.0 EFLOP"


# ---------------------------------------------------------------------------------------------
# analytic counts vs torch.utils.flop_counter on tiny models

# FlopCounterMode has no formula for the CPU SDPA kernels; count them as dense (non-causal)
# attention, like its formulas for the GPU kernels do
CPU_SDPA = {
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: (
        lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop_count(q, k, v)
    ),
    torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: (
        lambda g, q, k, v, *args, out_shape=None, **kwargs: sdpa_backward_flop_count(g, q, k, v)
    ),
}


def flop_gpt():
    """A tiny GPT (500 ids, width 64, 32-token context), seeded 0: its analytic count is that of ``model.config``."""
    return factories.tiny_gpt(vocab=500, hidden_size=64, intermediate_size=172)


def test_gpt_forward_flops_match_flop_counter() -> None:
    model = flop_gpt()
    config = model.config
    batch, context = 2, 32
    ids = torch.randint(0, 500, (batch, context))
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
        model(ids)
    measured = counter.get_total_flops() / (batch * context)
    # like with like: FlopCounterMode counts the full T x T score matrix, which averaged over the T
    # positions is exactly the "full" 4 * n_layer * T * d term at context T
    analytic = gpt_flops(config, context=context, attention="full")["inference_flops_per_token"]
    assert measured == pytest.approx(analytic, rel=0.10)
    assert measured == pytest.approx(analytic, rel=0.01)  # in fact they agree far closer


def test_gpt_training_flops_match_flop_counter() -> None:
    model = flop_gpt()
    config = model.config
    batch, context = 2, 32
    ids = torch.randint(0, 500, (batch, context))
    with FlopCounterMode(display=False, custom_mapping=CPU_SDPA) as counter:
        model.loss(ids)[0].backward()
    measured = counter.get_total_flops() / (batch * context)
    analytic = gpt_flops(config, context=context)["train_flops_per_token"]
    assert measured == pytest.approx(analytic, rel=0.10)


def test_autoencoder_flops_match_flop_counter() -> None:
    model = factories.tiny_autoencoder(vocab=500, hidden_size=64, intermediate_size=128, latent_size=16).eval()
    config = model.config
    chunks = 6
    ids = torch.randint(0, 500, (chunks, 4))
    analytic = ae_flops(config)
    assert analytic["params"] == model.num_parameters()
    with FlopCounterMode(display=False) as counter:
        mu, _ = model.encode(ids)
    assert counter.get_total_flops() / chunks == pytest.approx(analytic["encoder_flops_per_chunk"], rel=0.10)
    with FlopCounterMode(display=False) as counter:
        model.decode(mu)
    assert counter.get_total_flops() / chunks == pytest.approx(analytic["decoder_flops_per_chunk"], rel=0.10)
