"""The authors' checkpoint layout (``shaochenze/calm``) mapped onto ours: key names, aliases, configs.

Pure functions over state dicts and ``config.json`` dicts, no I/O; ``calm.interop.convert`` reads the files
and writes our checkpoint. The layout is that of the authors' code (``models/modeling_autoencoder.py``,
``modeling_calm.py``, ``modeling_energy.py``) and of their released checkpoints; the architecture is
paper §3 (autoencoder) and §4 (CALM). docs/guides/released-checkpoints.md describes the conversion.

- **Autoencoder**: ``encoder.encoder_layers.{i}`` / ``decoder.decoder_layers.{i}`` run in two
  stages of ``n // 2`` layers each (encoder: per token, then per chunk; decoder: per chunk, then per
  token); with an odd ``n`` the official code never runs the last layer, so it is dropped here.
  The output projection ``decoder.lm_head_weight`` is the input embedding (tied): checked bit-equal
  when present (a ``.bin``), absent from a ``save_pretrained`` safetensors file.
- **CALM**: ``ae_model.*`` is the embedded autoencoder (authoritative; ``ae_path`` is ignored),
  ``transformer.*`` a ``LlamaModel`` without LM head, ``embed_proj.{0,2,3}`` the input compression,
  and the energy head saved twice (``generative_head.*`` ≡ ``mlp_generator.*``; checked equal).
  Rotary ``inv_freq`` buffers are recomputed, never read.
- **Config**: ``config.json`` has no ``model_type``; the kind comes from ``architectures``
  (or, failing that, from the keys). Heads come from ``config.json`` (not derivable from shapes);
  every shape-derivable field is cross-checked against the tensors.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

import torch

from calm.config import AutoencoderConfig, CALMConfig, ConfigError
from calm.extensions import build_calm
from calm.models.autoencoder import Autoencoder

AE_LAYER = {
    "layernorm.weight": "norm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}
BACKBONE_LAYER = {
    "self_attn.q_proj.weight": "attn.q_proj.weight",
    "self_attn.k_proj.weight": "attn.k_proj.weight",
    "self_attn.v_proj.weight": "attn.v_proj.weight",
    "self_attn.o_proj.weight": "attn.o_proj.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "mlp_norm.weight",
}
HEAD_BLOCK = {"in_ln": "norm", "linears.0": "fc1", "linears.2": "fc2", "linears.4": "fc3", "down_proj": "down"}
HEAD_TOP = {
    "noise_embd": "noise_embd",
    "hidden_embd": "hidden_embd",
    "norm_noise": "noise_norm",
    "norm_hidden": "hidden_norm",
    "final_layer.in_ln": "final_norm",
    "final_layer.linears.0": "final_fc",
    "final_layer.linears.2": "final_out",
}
HEAD_PREFIX, HEAD_ALIAS = "generative_head.", "mlp_generator."
AE_OUTPUT_ALIAS = "decoder.lm_head_weight"
ROTARY = re.compile(r"(^|\.)rotary_emb\.inv_freq$")
OFFICIAL_HEAD_LN_EPS = 1e-6
"""The official head's LayerNorms hard-code eps 1e-6; ours use ``rms_norm_eps``."""


_KIND_NAMES = {"autoencoder": "a CALM-Autoencoder", "calm": "a CALM (EnergyTransformer)"}


class ConvertError(ValueError):
    """An official checkpoint cannot be converted; the message names the problem and the fix."""


# ----------------------------------------------------------------------------- key maps


def _layer_count(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    """Number of ``prefix{i}.`` layers, from the largest index present (0 if none)."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    found = [int(m.group(1)) for k in sd if (m := pattern.match(k))]
    return max(found) + 1 if found else 0


def autoencoder_key_map(num_encoder_layers: int, num_decoder_layers: int) -> dict[str, str | None]:
    """Official autoencoder key -> our key (None: a layer the official forward never runs)."""
    out: dict[str, str | None] = {
        "encoder.embed_tokens.weight": "embed_tokens.weight",
        "encoder.squeeze_layer.weight": "squeeze_layer.weight",
        "encoder.squeeze_layer.bias": "squeeze_layer.bias",
        "encoder.norm.weight": "enc_norm.weight",
        "encoder.hidden_to_latent.weight": "hidden_to_latent.weight",
        "encoder.hidden_to_latent.bias": "hidden_to_latent.bias",
        "decoder.latent_to_hidden.weight": "latent_to_hidden.weight",
        "decoder.latent_to_hidden.bias": "latent_to_hidden.bias",
        "decoder.expand_layer.weight": "expand_layer.weight",
        "decoder.expand_layer.bias": "expand_layer.bias",
        "decoder.norm.weight": "dec_norm.weight",
    }
    stages = (
        ("encoder.encoder_layers", num_encoder_layers, "enc_token_layers", "enc_chunk_layers"),
        ("decoder.decoder_layers", num_decoder_layers, "dec_chunk_layers", "dec_token_layers"),
    )
    for src, n, first, second in stages:
        half = n // 2
        for i in range(n):
            dst = f"{first}.{i}" if i < half else f"{second}.{i - half}" if i < 2 * half else None
            for a, b in AE_LAYER.items():
                out[f"{src}.{i}.{a}"] = f"{dst}.{b}" if dst else None
    return out


def calm_key_map(num_layers: int, num_head_blocks: int, ae_encoder: int, ae_decoder: int) -> dict[str, str | None]:
    """Official EnergyTransformer key -> our CALM key; the head under ``generative_head.``."""
    out: dict[str, str | None] = {
        f"ae_model.{k}": (f"autoencoder.{v}" if v else None)
        for k, v in autoencoder_key_map(ae_encoder, ae_decoder).items()
    }
    out["transformer.embed_tokens.weight"] = "embed_tokens.weight"
    for i in range(num_layers):
        for a, b in BACKBONE_LAYER.items():
            out[f"transformer.layers.{i}.{a}"] = f"backbone.layers.{i}.{b}"
    out["transformer.norm.weight"] = "backbone.norm.weight"
    for i in (0, 2, 3):
        for p in ("weight", "bias"):
            out[f"embed_proj.{i}.{p}"] = f"embed_proj.{i}.{p}"
    head = dict(HEAD_TOP)
    for j in range(num_head_blocks):
        head.update({f"mlp_blocks.{j}.{a}": f"blocks.{j}.{b}" for a, b in HEAD_BLOCK.items()})
    for a, b in head.items():
        for p in ("weight", "bias"):
            out[f"{HEAD_PREFIX}{a}.{p}"] = f"head.{b}.{p}"
    return out


# ----------------------------------------------------------------------------- configs


def detect_kind(config: Mapping[str, Any], sd: Mapping[str, torch.Tensor]) -> str:
    """``autoencoder`` or ``calm`` from ``architectures``, else from the keys."""
    arch = config.get("architectures") or []
    if config.get("model_type") in ("flow", "diffusion") or {"FlowTransformer", "DiffusionTransformer"} & set(arch):
        raise ConvertError(
            f"architectures={arch}, model_type={config.get('model_type')!r}: only the energy head (CALM-M/L/XL) "
            "is supported by this converter; the official flow and diffusion heads use adaLN ResBlocks, "
            "which calm's own flow / diffusion heads (model.head) do not (see calm/models/heads.py)"
        )
    by_keys = (
        "calm"
        if any(k.startswith("transformer.") for k in sd)
        else "autoencoder"
        if any(k.startswith("encoder.") for k in sd)
        else None
    )
    by_config = "autoencoder" if "Autoencoder" in arch else "calm" if "EnergyTransformer" in arch else None
    if by_keys is None:
        raise ConvertError(
            "cannot tell the model kind: the weights have neither 'encoder.*' (CALM-Autoencoder) nor "
            "'transformer.*' (CALM) keys; pass the folder of an official checkpoint"
        )
    if by_config is not None and by_config != by_keys:
        raise ConvertError(
            f"config.json says architectures={arch} but the weights are {_KIND_NAMES[by_keys]}'s; config.json and "
            "the weights come from different repositories: download both from the same one"
        )
    return by_keys


def _shape(sd: Mapping[str, torch.Tensor], key: str) -> tuple[int, ...]:
    if key not in sd:
        raise ConvertError(f"the weights lack {key!r}; the checkpoint is incomplete or not an official CALM file")
    return tuple(sd[key].shape)


def _check_fields(config: Mapping[str, Any], derived: Mapping[str, int], what: str) -> None:
    """Every config field that the tensors determine must agree with them."""
    for name, value in derived.items():
        stated = config.get(name)
        if stated is not None and int(stated) != value:
            raise ConvertError(
                f"{what} config.json says {name}={stated} but the weights imply {name}={value}; the config "
                "and weights come from different models: download both from the same repository revision"
            )


def autoencoder_config(
    config: Mapping[str, Any], sd: Mapping[str, torch.Tensor], prefix: str = "", what: str = "autoencoder"
) -> AutoencoderConfig:
    """Our ``AutoencoderConfig`` from the tensors under ``prefix``, cross-checked with ``config``.

    ``config`` may be empty (the autoencoder embedded in a CALM file has no config of its own).
    """
    vocab, hidden = _shape(sd, f"{prefix}encoder.embed_tokens.weight")
    inter = _shape(sd, f"{prefix}encoder.encoder_layers.0.mlp.gate_proj.weight")[0]
    squeeze_in = _shape(sd, f"{prefix}encoder.squeeze_layer.weight")[1]
    latent2 = _shape(sd, f"{prefix}encoder.hidden_to_latent.weight")[0]
    if squeeze_in % hidden or latent2 % 2:
        raise ConvertError(
            f"{what}: squeeze_layer input {squeeze_in} is not a multiple of hidden_size {hidden}, or "
            f"hidden_to_latent output {latent2} is odd; these are not official autoencoder weights"
        )
    derived = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": inter,
        "patch_size": squeeze_in // hidden,
        "latent_size": latent2 // 2,
        "num_encoder_layers": _layer_count(sd, f"{prefix}encoder.encoder_layers."),
        "num_decoder_layers": _layer_count(sd, f"{prefix}decoder.decoder_layers."),
    }
    _check_fields(config, derived, what)
    for name in ("num_encoder_layers", "num_decoder_layers"):
        if derived[name] < 2:
            raise ConvertError(f"{what}: {name}={derived[name]}; the official model needs >= 2 (two stages)")
    dropout = float(config.get("ae_dropout", 0.15))
    return AutoencoderConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=inter,
        num_encoder_layers=2 * (derived["num_encoder_layers"] // 2),
        num_decoder_layers=2 * (derived["num_decoder_layers"] // 2),
        latent_size=derived["latent_size"],
        chunk_size=derived["patch_size"],
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        kl_weight=float(config.get("kl_weight", 1e-3)),
        kl_clamp=float(config.get("kl_clamp", 0.5)),
        token_dropout=dropout,
        latent_dropout=dropout,
        drop_token_id=0,
    )


def _check_unsupported(config: Mapping[str, Any]) -> None:
    """Official options our modules do not implement: refuse them rather than convert wrongly."""
    checks = (
        ("rope_scaling", None, "RoPE scaling is not implemented"),
        ("attention_bias", False, "attention biases are not implemented"),
        ("mlp_bias", False, "MLP biases are not implemented"),
        ("hidden_act", "silu", "only SiLU (SwiGLU) MLPs are implemented"),
        ("model_type", "energy", "only the energy head converts (calm's flow / diffusion heads use another network)"),
    )
    for name, supported, why in checks:
        value = config.get(name, supported)
        if value != supported and value != "":
            raise ConvertError(f"CALM config.json has {name}={value!r}: {why}; calm converts {name}={supported!r}")
    eps = float(config.get("rms_norm_eps", 1e-6))
    if eps != OFFICIAL_HEAD_LN_EPS:
        raise ConvertError(
            f"CALM config.json has rms_norm_eps={eps}, but the official head's LayerNorms use 1e-6 whatever it "
            "says, and calm's use rms_norm_eps: this checkpoint would not convert exactly"
        )


def calm_config(config: Mapping[str, Any], sd: Mapping[str, torch.Tensor]) -> CALMConfig:
    """Our ``CALMConfig`` from ``config.json`` (heads, RoPE, eps) and the tensors (all shapes)."""
    _check_unsupported(config)
    vocab, hidden = _shape(sd, "transformer.embed_tokens.weight")
    heads = config.get("num_attention_heads")
    if not isinstance(heads, int) or heads < 1:
        raise ConvertError(
            f"CALM config.json has num_attention_heads={heads!r}; the head count cannot be read from the "
            "weights, so config.json must state it (download the repository's config.json again)"
        )
    kv_heads = config.get("num_key_value_heads") or heads
    if hidden % heads:
        raise ConvertError(
            f"CALM config.json has num_attention_heads={heads}, which does not divide hidden_size={hidden}; "
            "the config is corrupt or belongs to another model: download config.json again"
        )
    head_dim = hidden // heads
    if heads % kv_heads:
        raise ConvertError(
            f"CALM config.json has num_key_value_heads={kv_heads}, which does not divide num_attention_heads="
            f"{heads}; the config is corrupt: download config.json again"
        )
    q_rows = _shape(sd, "transformer.layers.0.self_attn.q_proj.weight")[0]
    k_rows = _shape(sd, "transformer.layers.0.self_attn.k_proj.weight")[0]
    if q_rows != heads * head_dim or k_rows != kv_heads * head_dim:
        raise ConvertError(
            f"CALM config.json says {heads} query / {kv_heads} key-value heads of {head_dim} dims, but q_proj has "
            f"{q_rows} and k_proj {k_rows} output rows; config.json does not belong to these weights"
        )
    compress_in = _shape(sd, "embed_proj.0.weight")[1]
    if compress_in % hidden:
        raise ConvertError(f"embed_proj.0.weight takes {compress_in} inputs, not a multiple of hidden_size={hidden}")
    derived = {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": _shape(sd, "transformer.layers.0.mlp.gate_proj.weight")[0],
        "num_hidden_layers": _layer_count(sd, "transformer.layers."),
        "patch_size": compress_in // hidden,
        "latent_size": _shape(sd, f"{HEAD_PREFIX}final_layer.linears.2.weight")[0],
        "noise_size": _shape(sd, f"{HEAD_PREFIX}noise_embd.weight")[1],
        "num_mlp_layers": _layer_count(sd, f"{HEAD_PREFIX}mlp_blocks."),
    }
    _check_fields(config, derived, "CALM")
    try:
        out = CALMConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=derived["intermediate_size"],
            num_layers=derived["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=kv_heads if kv_heads != heads else None,
            max_seq_len=int(config.get("max_position_embeddings", 2048)),
            rope_theta=float(config.get("rope_theta", 10000.0)),
            rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
            chunk_size=derived["patch_size"],
            latent_size=derived["latent_size"],
            noise_size=derived["noise_size"],
            num_head_blocks=derived["num_mlp_layers"],
            num_samples=int(config.get("num_samples", 8)),
            num_target_samples=100,  # hard-coded in the official energy_score
            energy_alpha=float(config.get("beta", 1.0)),
        )
        out.validate()
    except ConfigError as e:
        raise ConvertError(f"CALM config.json describes a model calm cannot build: {e}") from e
    return out


# ----------------------------------------------------------------------------- state dicts


def _fold_alias(sd: dict[str, torch.Tensor], keep: str, alias: str, what: str) -> None:
    """Drop ``alias`` after checking it holds the same values as ``keep`` (or move it to ``keep``)."""
    if alias not in sd:
        return
    if keep not in sd:
        sd[keep] = sd.pop(alias)
        return
    a, b = sd[keep], sd.pop(alias)
    if a.is_meta or b.is_meta:
        if a.shape != b.shape:
            raise ConvertError(f"{alias} has shape {tuple(b.shape)} but {keep} {tuple(a.shape)}; {what}")
    elif a.shape != b.shape or not torch.equal(a, b):
        raise ConvertError(f"{alias} differs from {keep}, which the official model ties to it; {what}")


def _fold_aliases(sd: Mapping[str, torch.Tensor], kind: str) -> dict[str, torch.Tensor]:
    """A copy without rotary buffers and aliases, each alias checked against what it aliases."""
    out = {k: v for k, v in sd.items() if not ROTARY.search(k)}
    bad = "the file is corrupt or was edited: download it again"
    prefix = "ae_model." if kind == "calm" else ""
    _fold_alias(out, prefix + "encoder.embed_tokens.weight", prefix + AE_OUTPUT_ALIAS, bad)
    if kind == "calm":
        for key in [k for k in out if k.startswith(HEAD_ALIAS)]:
            _fold_alias(out, HEAD_PREFIX + key[len(HEAD_ALIAS) :], key, bad)
    return out


def _apply_map(
    sd: Mapping[str, torch.Tensor], key_map: Mapping[str, str | None], expected: Mapping[str, torch.Size], what: str
) -> dict[str, torch.Tensor]:
    """Rename with ``key_map``; refuse unknown and missing keys and wrong shapes, naming them."""
    unknown = sorted(k for k in sd if k not in key_map)
    if unknown:
        more = f" and {len(unknown) - 8} more" if len(unknown) > 8 else ""
        raise ConvertError(
            f"{what} weights have keys the official layout does not know: {unknown[:8]}{more}; "
            "this is not an unmodified official checkpoint (or a newer format): nothing was converted"
        )
    wanted = {src for src, dst in key_map.items() if dst is not None}
    missing = sorted(wanted - set(sd))
    if missing:
        more = f" and {len(missing) - 8} more" if len(missing) > 8 else ""
        raise ConvertError(
            f"{what} weights lack {missing[:8]}{more}; the file is incomplete: download it (and every shard) again"
        )
    out: dict[str, torch.Tensor] = {}
    for src, dst in key_map.items():
        if dst is None or src not in sd:
            continue
        if tuple(sd[src].shape) != tuple(expected[dst]):
            raise ConvertError(
                f"{what}: {src} has shape {tuple(sd[src].shape)} but the model described by config.json needs "
                f"{tuple(expected[dst])}; the config and weights do not belong together"
            )
        out[dst] = sd[src]
    if set(out) != set(expected):
        raise ConvertError(f"{what}: internal key map incomplete: {sorted(set(expected) - set(out))[:8]}")
    return out


def _meta_shapes(build: Callable[[], torch.nn.Module]) -> dict[str, torch.Size]:
    with torch.device("meta"):
        model = build()
    return {k: v.shape for k, v in model.state_dict().items()}


def convert_autoencoder(
    config: Mapping[str, Any], sd: Mapping[str, torch.Tensor]
) -> tuple[AutoencoderConfig, dict[str, torch.Tensor]]:
    """An official CALM-Autoencoder (config.json + state dict) -> our config and state dict.

    Tensors are not copied; meta tensors are accepted (structure checks without weights).
    Raises ConvertError naming any unknown, missing or mis-shaped key or inconsistent config field.
    """
    sd = _fold_aliases(sd, "autoencoder")
    cfg = autoencoder_config(config, sd)
    key_map = autoencoder_key_map(
        _layer_count(sd, "encoder.encoder_layers."), _layer_count(sd, "decoder.decoder_layers.")
    )
    return cfg, _apply_map(sd, key_map, _meta_shapes(lambda: Autoencoder(cfg)), "autoencoder")


def convert_calm(
    config: Mapping[str, Any], sd: Mapping[str, torch.Tensor]
) -> tuple[CALMConfig, AutoencoderConfig, dict[str, torch.Tensor]]:
    """An official EnergyTransformer (CALM-M/L/XL) -> our CALM config, embedded AE config, state dict.

    The embedded ``ae_model.*`` is the autoencoder (``config['ae_path']`` is ignored).
    Raises ConvertError as :func:`convert_autoencoder`, and for a head count that does not fit.
    """
    sd = _fold_aliases(sd, "calm")
    cfg = calm_config(config, sd)
    ae_cfg = autoencoder_config({}, sd, prefix="ae_model.", what="embedded autoencoder (ae_model.*)")
    if (ae_cfg.chunk_size, ae_cfg.latent_size, ae_cfg.vocab_size) != (cfg.chunk_size, cfg.latent_size, cfg.vocab_size):
        raise ConvertError(
            f"the embedded autoencoder has K={ae_cfg.chunk_size}, latent {ae_cfg.latent_size}, vocab "
            f"{ae_cfg.vocab_size} but the CALM has K={cfg.chunk_size}, latent {cfg.latent_size}, vocab "
            f"{cfg.vocab_size}; the file is not a consistent official checkpoint"
        )
    key_map = calm_key_map(
        cfg.num_layers,
        cfg.head_blocks,
        _layer_count(sd, "ae_model.encoder.encoder_layers."),
        _layer_count(sd, "ae_model.decoder.decoder_layers."),
    )
    expected = _meta_shapes(lambda: build_calm(cfg, Autoencoder(ae_cfg)))
    return cfg, ae_cfg, _apply_map(sd, key_map, expected, "CALM")
