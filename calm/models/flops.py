"""Parameter and FLOP accounting from configs alone; reproduces the paper's Table 1.

Everything is computed from the config dataclasses. No model is built, so the paper-size numbers
cost nothing. The conventions follow Table 1 (as we infer them):

* A matmul with a weight of m parameters costs 2·m FLOPs per row. Norms, activations, biases,
  RoPE and softmax are left out, as FlopCounterMode leaves them out. Embedding lookups are free.
* Attention scores and the weighted sum cost 4·n_layer·context·d per step for a query that sees
  ``context`` keys: the "last token at full context" convention of Table 1
  (``attention="full"``). ``attention="causal"`` uses half of that, 2·n_layer·context·d, the mean
  over the positions of a causal sequence of length ``context``, which is what training on such a
  sequence actually costs.
* Training costs 3× the forward pass (backward = 2× forward) for every trained matmul. The frozen
  autoencoder encoder that produces CALM's targets runs forward only.
* Transformer, per token: inference = 2·(non-embedding matmul params + lm_head) + attention;
  training = 3 × inference.
* CALM produces K = ``chunk_size`` tokens per backbone step, so per token:
  inference = [2·(backbone + embed_proj) + attention + S·(passes·2·head + AE decoder)] / K, where
  S = ``num_samples_inference`` (1 in Table 1) and passes = head passes per sample (energy 1, flow
  2·flow_steps, diffusion diffusion_steps; ``head_passes_per_sample``).
  training = [3·(2·(backbone + embed_proj) + attention + N·2·head) + AE encoder] / K, where
  N = ``config.num_samples`` (8).

The paper does not spell out its own accounting. For how close these conventions come to Table 1,
see the tests and ``PAPER_TABLE1``. The "full" attention convention and 500B training tokens
(250k steps × "2M" tokens) reproduce the three Transformer rows to within 1%. CALM-M's training
FLOPs, 3.7e20 ≈ (3 × 0.93 + 0.02)/4 GFLOP per token over 524B tokens, follow the "causal"
convention (0.93 = 0.40 backbone + 0.07 causal attention + 0.02 embed_proj + 8 × 0.055 head).
"""

from __future__ import annotations

from typing import Any

from calm.config import AutoencoderConfig, CALMConfig, GPTConfig, TransformerConfig, config_from_dict

PAPER_TRAIN_TOKENS = 250_000 * 2_097_152
"""Tokens seen by CALM and the baseline: 250k steps × 2,097,152 tokens ≈ 524B (paper §7.1)."""
PAPER_AE_TRAIN_TOKENS = 30_000 * 524_288
"""Tokens seen by the autoencoder: 30k steps × 524,288 tokens ≈ 15.7B (paper §7.1)."""

PAPER_TABLE1: dict[str, dict[str, float]] = {
    "Transformer-S": {"params": 281e6, "train_flops_total": 6.6e20, "inference_flops_per_token": 4.4e8},
    "Transformer-M": {"params": 465e6, "train_flops_total": 11.9e20, "inference_flops_per_token": 7.9e8},
    "Transformer-L": {"params": 849e6, "train_flops_total": 22.5e20, "inference_flops_per_token": 15.0e8},
    "CALM-M": {"params": 371e6, "train_flops_total": 3.7e20, "inference_flops_per_token": 2.9e8},
    "CALM-L": {"params": 735e6, "train_flops_total": 7.7e20, "inference_flops_per_token": 4.6e8},
    "CALM-XL": {"params": 1.82e9, "train_flops_total": 19.5e20, "inference_flops_per_token": 9.4e8},
}
"""Table 1 of the paper (K = 4), as reported."""

_ATTENTION_FACTORS = {"full": 4, "causal": 2}


# --------------------------------------------------------------------------------------------
# building blocks


def _check_attention(attention: str) -> int:
    if attention not in _ATTENTION_FACTORS:
        raise ValueError(f"attention must be 'full' or 'causal', got {attention!r}")
    return _ATTENTION_FACTORS[attention]


def layer_matmul_params(config: TransformerConfig) -> int:
    """Weights of the matmuls in one Llama block: q, k, v, o and the SwiGLU gate, up and down."""
    d, q_dim, kv_dim = (
        config.hidden_size,
        config.num_heads * config.head_dim,
        config.kv_heads * config.head_dim,
    )
    return d * q_dim + 2 * d * kv_dim + q_dim * d + 3 * d * config.intermediate_size


def backbone_params(config: TransformerConfig) -> int:
    """All backbone parameters: blocks (matmuls + two RMSNorms each) and the final RMSNorm."""
    d = config.hidden_size
    return config.num_layers * (layer_matmul_params(config) + 2 * d) + d


def attention_flops_per_step(config: TransformerConfig, context: int, attention: str = "full") -> int:
    """Score and weighted-sum FLOPs of one backbone step seeing ``context`` keys (or their causal mean)."""
    factor = _check_attention(attention)
    return factor * config.num_layers * context * config.num_heads * config.head_dim


def embed_proj_params(config: CALMConfig) -> tuple[int, int]:
    """(all params, matmul weights) of input compression: Linear(K·d→2d) → SiLU → Linear(2d→d) → LN."""
    d, K = config.hidden_size, config.chunk_size
    matmul = K * d * 2 * d + 2 * d * d
    return matmul + 2 * d + d + 2 * d, matmul


def energy_head_params(config: CALMConfig) -> tuple[int, int]:
    """(all params, matmul weights) of the energy head (paper §4.2); every Linear has a bias.

    noise_embd Linear(noise→d)+LN, hidden_embd Linear(d→d)+LN, ``head_blocks`` MLP blocks of
    LN + Linear(2d→d), Linear(d→d), Linear(d→2d), down Linear(d→d) (≈ 6d²), then
    LN + Linear(d→d) + Linear(d→latent).
    """
    d, noise, latent = config.hidden_size, config.noise_size, config.latent_size
    block_matmul = 2 * d * d + d * d + d * 2 * d + d * d
    matmul = noise * d + d * d + config.head_blocks * block_matmul + d * d + d * latent
    block_other = 2 * d + (d + d + 2 * d + d)  # LayerNorm + biases
    other = (d + 2 * d) + (d + 2 * d) + config.head_blocks * block_other + (2 * d + d + latent)
    if config.token_anchor:  # ours: the readout d→vocab, the token embedding + LayerNorm, the latent offsets
        # the readout runs once per step, not per sample: counted apart (``calm_flops``), not in matmul
        other += 2 * d * config.vocab_size + 2 * d + config.vocab_size * latent
    return matmul + other, matmul


def conditional_head_params(config: CALMConfig) -> tuple[int, int]:
    """(all params, matmul weights) of the flow / diffusion network (``calm.models.heads``; Figs. 8-9).

    latent_embd Linear(latent→d), hidden_embd Linear(d→d)+LN, time MLP Linear(256→d), Linear(d→d),
    then the energy head's ``head_blocks`` MLP blocks and output layers.
    """
    d, latent, time_dim = config.hidden_size, config.latent_size, 256
    block_matmul = 2 * d * d + d * d + d * 2 * d + d * d
    matmul = latent * d + d * d + time_dim * d + d * d + config.head_blocks * block_matmul + d * d + d * latent
    block_other = 2 * d + (d + d + 2 * d + d)
    other = d + (d + 2 * d) + d + d + config.head_blocks * block_other + (2 * d + d + latent)
    return matmul + other, matmul


def head_params(config: CALMConfig) -> tuple[int, int]:
    """(all params, matmul weights) of the head ``config.head`` names."""
    return energy_head_params(config) if config.head == "energy" else conditional_head_params(config)


def head_passes_per_sample(config: CALMConfig) -> int:
    """Head forward passes one *sample* costs at inference (the head ablation, Figs. 8-9).

    energy: 1; flow: 2 per midpoint step (``flow_steps``); diffusion: 1 per respaced step
    (``diffusion_steps``). Training runs one pass per replica for every head (N = ``num_samples``).
    """
    if config.head == "energy":
        return 1
    if config.head == "flow":
        return 2 * config.flow_steps
    if config.head == "diffusion":
        return config.diffusion_steps
    raise ValueError(f"unknown head {config.head!r}; choose energy, flow or diffusion")


def input_params(config: CALMConfig) -> tuple[int, int]:
    """(all params, matmul weights) of the backbone input of ``config.input`` (paper §4, Table 5).

    discrete: embed_proj; continuous: Linear(latent→d) with bias; both: the two.
    """
    total = matmul = 0
    if config.input in ("discrete", "both"):
        total, matmul = embed_proj_params(config)
    if config.input in ("continuous", "both"):
        linear = config.latent_size * config.hidden_size
        total, matmul = total + linear + config.hidden_size, matmul + linear
    return total, matmul


# --------------------------------------------------------------------------------------------
# autoencoder


def ae_flops(config: AutoencoderConfig) -> dict[str, int | float]:
    """Parameters and per-chunk forward FLOPs of the chunk autoencoder (paper §3).

    The decoder's tied vocabulary projection (K·d·V weights used per chunk) dominates:
    ≈ 0.53 of the 0.55 GFLOP per chunk for the paper AE. ``train_flops_per_token`` is
    3·(encoder + decoder)/K, the cost of stage-1 training.
    """
    d, K, V, latent = config.hidden_size, config.chunk_size, config.vocab_size, config.latent_size
    ae_layer_matmul = 3 * d * config.intermediate_size
    ae_layer = ae_layer_matmul + d  # + RMSNorm
    enc_half, dec_half = config.num_encoder_layers // 2, config.num_decoder_layers // 2
    # the token-level stage runs on each of the K positions, the chunk-level stage once
    enc_matmul = K * enc_half * ae_layer_matmul + K * d * d + enc_half * ae_layer_matmul + d * 2 * latent
    vocab_matmul = K * d * V
    dec_matmul = latent * d + dec_half * ae_layer_matmul + d * K * d + K * dec_half * ae_layer_matmul + vocab_matmul
    embedding = V * d
    encoder_params = (2 * enc_half) * ae_layer + (K * d * d + d) + d + (d * 2 * latent + 2 * latent)
    decoder_params = (latent * d + d) + (2 * dec_half) * ae_layer + (d * K * d + K * d) + d
    return {
        "params": embedding + encoder_params + decoder_params,
        "embedding_params": embedding,
        "encoder_params": encoder_params,
        "decoder_params": decoder_params,
        "encoder_flops_per_chunk": 2 * enc_matmul,
        "decoder_flops_per_chunk": 2 * dec_matmul,
        "vocab_projection_flops_per_chunk": 2 * vocab_matmul,
        "train_flops_per_token": 3 * 2 * (enc_matmul + dec_matmul) / K,
    }


# --------------------------------------------------------------------------------------------
# models


def gpt_flops(
    config: GPTConfig, context: int = 2048, attention: str = "full", train_tokens: float = PAPER_TRAIN_TOKENS
) -> dict[str, Any]:
    """Parameters and FLOPs per token of the token-level baseline (Table 1 "Transformer-*").

    ``inference_flops_per_token`` = 2·(non-embedding matmuls + lm_head) + attention at ``context``;
    ``train_flops_per_token`` = 3 × that; ``train_flops_total`` = per token × ``train_tokens``.
    ``non_embedding_params`` counts the lm_head (as ``GPT.num_parameters(non_embedding=True)``).
    """
    d, V = config.hidden_size, config.vocab_size
    embedding = lm_head = V * d
    backbone = backbone_params(config)
    matmul = config.num_layers * layer_matmul_params(config) + lm_head
    attn = attention_flops_per_step(config, context, attention)
    inference = 2 * matmul + attn
    train = 3 * inference
    return {
        "params": embedding + backbone + lm_head,
        "non_embedding_params": backbone + lm_head,
        "embedding_params": embedding,
        "backbone_params": backbone,
        "lm_head_params": lm_head,
        "inference_flops_per_token": inference,
        "train_flops_per_token": train,
        "train_flops_total": train * train_tokens,
        "breakdown": {
            "backbone_matmul": 2 * (matmul - lm_head),
            "lm_head": 2 * lm_head,
            "attention": attn,
        },
    }


def calm_flops(
    config: CALMConfig,
    ae_config: AutoencoderConfig,
    context: int = 2048,
    num_samples_inference: int = 1,
    attention: str = "full",
    train_tokens: float = PAPER_TRAIN_TOKENS,
    ae_train_tokens: float = PAPER_AE_TRAIN_TOKENS,
) -> dict[str, Any]:
    """Parameters and FLOPs per *token* of CALM (Table 1 "CALM-*"); ``context`` is in backbone steps.

    ``params`` counts the embedding, backbone, input compression and head. The frozen AE is
    left out, which matches the paper's numbers (Table 1). Inference with S =
    ``num_samples_inference`` head samples per step (e.g. 200 for batch temperature sampling) runs
    the AE decoder S times and the head S × ``head_passes_per_sample`` times (1 for the energy head,
    2·flow_steps for flow, diffusion_steps for diffusion; Figs. 8-9); with a continuous input
    the AE encoder re-encodes each generated chunk. Training runs ``config.num_samples`` head passes
    (one per replica, whatever the head) and the frozen AE encoder on the targets.
    ``train_flops_total`` is the language model's training on ``train_tokens`` (the paper's accounting,
    which the equal-compute comparison holds equal); ``ae_train_flops_total`` is the autoencoder's on
    ``ae_train_tokens`` (stage 1; the paper's 15.7B tokens by default), and
    ``train_flops_total_with_autoencoder`` the sum: what CALM costs to train from scratch.
    """
    if config.chunk_size != ae_config.chunk_size:
        raise ValueError(
            f"autoencoder chunk_size={ae_config.chunk_size} but the language model expects "
            f"{config.chunk_size}; pick an autoencoder with chunk_size={config.chunk_size}"
        )
    K, d = config.chunk_size, config.hidden_size
    embedding = config.vocab_size * d if config.input in ("discrete", "both") else 0
    backbone = backbone_params(config)
    proj, proj_matmul = input_params(config)
    head, head_matmul = head_params(config)
    passes = head_passes_per_sample(config)
    ae = ae_flops(ae_config)
    backbone_fwd = 2 * config.num_layers * layer_matmul_params(config)
    attn = attention_flops_per_step(config, context, attention)
    head_fwd = 2 * head_matmul
    inference_step = {
        "backbone_matmul": backbone_fwd,
        "attention": attn,
        "embed_proj": 2 * proj_matmul,
        "head": num_samples_inference * passes * head_fwd,
        "ae_decoder": num_samples_inference * ae["decoder_flops_per_chunk"],
    }
    if config.token_anchor:  # ours: the first-token readout, once per step (its training cost: token_aux)
        inference_step["token_readout"] = 2 * d * config.vocab_size
    if config.input in ("continuous", "both"):
        # the generated chunk is re-encoded to the next step's input latent
        inference_step["ae_encoder"] = ae["encoder_flops_per_chunk"]
    train_forward_step = backbone_fwd + attn + 2 * proj_matmul + config.num_samples * head_fwd
    if config.token_aux_weight > 0:  # ours: the training-only next-token readouts of h (d x vocab each)
        train_forward_step += 2 * d * config.token_aux_tokens * config.vocab_size
    if config.token_score_weight > 0:  # ours: n more head samples, the probe on them and on one target sample
        n = config.token_score_samples
        train_forward_step += n * head_fwd + 2 * config.latent_size * config.vocab_size * (n + 1)
    train_step = 3 * train_forward_step + ae["encoder_flops_per_chunk"]
    train = train_step / K
    return {
        "params": embedding + backbone + proj + head,
        "embedding_params": embedding,
        "backbone_params": backbone,
        "embed_proj_params": proj,
        "head_params": head,
        "head_passes_per_sample": passes,
        "inference_flops_per_token": sum(inference_step.values()) / K,
        "train_flops_per_token": train,
        "train_forward_flops_per_step": train_forward_step,
        "train_flops_total": train * train_tokens,
        "ae_train_flops_total": ae["train_flops_per_token"] * ae_train_tokens,
        "train_flops_total_with_autoencoder": train * train_tokens + ae["train_flops_per_token"] * ae_train_tokens,
        "breakdown": {
            "inference_per_step": inference_step,
            "ae_encoder_per_step": ae["encoder_flops_per_chunk"],
        },
    }


def training_context_steps(config: dict[str, Any]) -> int:
    """The context, in backbone steps, a saved model trained with: its training block (``train.block_size``
    tokens; a CALM's in chunks of K), or its ``max_seq_len`` when the config has no training section."""
    model, block = config["model"], int(config.get("train", {}).get("block_size", 0))
    if not block:
        return int(model["max_seq_len"])
    return block // int(model["chunk_size"]) if config["kind"] == "calm" else block


def run_flops(
    config: dict[str, Any],
    *,
    context: int | None = None,
    train_tokens: float = PAPER_TRAIN_TOKENS,
    ae_train_tokens: float = PAPER_AE_TRAIN_TOKENS,
    num_samples_inference: int = 1,
) -> dict[str, Any] | None:
    """:func:`calm_flops` or :func:`gpt_flops` of a saved model config (a run's ``run_config.json`` or a
    checkpoint's ``config.json``: ``kind``, ``model``, ``autoencoder``, ``train``), with its ``kind``.
    ``context`` in steps defaults to :func:`training_context_steps`. None for an autoencoder."""
    context = context or training_context_steps(config)
    if config["kind"] == "calm":
        model = config_from_dict(CALMConfig, config["model"])
        ae = config_from_dict(AutoencoderConfig, config["autoencoder"])
        flops = calm_flops(
            model, ae, context=context, num_samples_inference=num_samples_inference, train_tokens=train_tokens,
            ae_train_tokens=ae_train_tokens,
        )  # fmt: skip
        return {"kind": "calm", **flops}
    if config["kind"] == "gpt":
        return {
            "kind": "gpt",
            **gpt_flops(config_from_dict(GPTConfig, config["model"]), context, train_tokens=train_tokens),
        }
    return None


# --------------------------------------------------------------------------------------------
# the paper's presets


def paper_configs() -> dict[str, tuple[Any, ...]]:
    """The six Table-1 models as configs: "Transformer-S" -> (GPTConfig,), "CALM-M" -> (CALMConfig, AE).

    Sizes from paper §7.1; L uses 24 heads and XL 40 (head dim 64, inferred), which changes no count.
    """
    sizes = {
        "S": (12, 768, 2048, 16),
        "M": (16, 1024, 2752, 16),
        "L": (16, 1536, 4096, 24),
        "XL": (16, 2560, 6880, 40),
    }
    ae = AutoencoderConfig()
    out: dict[str, tuple[Any, ...]] = {}
    for name in ("S", "M", "L"):
        layers, d, inter, heads = sizes[name]
        out[f"Transformer-{name}"] = (
            GPTConfig(num_layers=layers, hidden_size=d, intermediate_size=inter, num_heads=heads),
        )
    for name in ("M", "L", "XL"):
        layers, d, inter, heads = sizes[name]
        calm = CALMConfig(num_layers=layers, hidden_size=d, intermediate_size=inter, num_heads=heads)
        out[f"CALM-{name}"] = (calm, ae)
    return out


def table1(
    context: int = 2048, attention: str = "full", train_tokens: float = PAPER_TRAIN_TOKENS
) -> dict[str, dict[str, Any]]:
    """Our accounting of every Table-1 row: name -> the ``gpt_flops`` / ``calm_flops`` dict."""
    rows = {}
    for name, configs in paper_configs().items():
        if name.startswith("CALM"):
            rows[name] = calm_flops(*configs, context=context, attention=attention, train_tokens=train_tokens)
        else:
            rows[name] = gpt_flops(*configs, context=context, attention=attention, train_tokens=train_tokens)
    return rows


def format_flops(x: float, unit: str = "FLOP") -> str:
    """Human-readable count with an SI prefix: 4.424e8 -> '442.4 MFLOP', 6.96e20 -> '696.0 EFLOP'."""
    prefixes = [
        (1e24, "Y"),
        (1e21, "Z"),
        (1e18, "E"),
        (1e15, "P"),
        (1e12, "T"),
        (1e9, "G"),
        (1e6, "M"),
        (1e3, "k"),
    ]
    for scale, prefix in prefixes:
        if abs(x) >= scale:
            return f"{x / scale:.1f} {prefix}{unit}"
    return f"{x:.1f} {unit}"
