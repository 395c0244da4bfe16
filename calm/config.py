"""Configuration dataclasses and named presets for every model and training stage.

Model configs hold architecture numbers only (paper §3 and §4, sizes in §7.1); ``TrainConfig`` holds the
optimisation recipe (paper §7.1). Presets live in ``calm/configs/*.yaml`` next to this file, one
file per model kind, so the paper's numbers are readable without running code.
Every config validates itself in ``validate()`` so that an impossible setting fails before any
work starts, with a message that says what to change.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"


class ConfigError(ValueError):
    """A configuration value is impossible or inconsistent; the message says how to fix it."""


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


CALM_HEADS: tuple[str, ...] = ("energy", "flow", "diffusion")
CALM_INPUTS: tuple[str, ...] = ("discrete", "continuous", "both")
KL_MODES: tuple[str, ...] = ("off", "plain", "clipped")


def latent_ablation_overrides(latent_size: int) -> dict[str, Any]:
    """``--set`` overrides of the paper's latent-size ablation (Fig. 7) for one AE latent size.

    The paper trains l ∈ {32, 64, 128, 256} with both dropouts (DropToken, DropLatent) scaled to
    0.05 / 0.10 / 0.15 / 0.20, i.e. p = 0.05·log2(l/16); other sizes follow the same rule. Raises
    ConfigError where the rule gives no valid rate (l <= 16 or l >= 2^20·16).
    """
    _require(
        isinstance(latent_size, int) and latent_size > 16, f"latent_size must be an integer > 16, got {latent_size}"
    )
    p = round(0.05 * math.log2(latent_size / 16), 6)
    _require(p < 1.0, f"latent_size={latent_size} gives a dropout of {p} >= 1 under the paper's scaling rule")
    return {"model.latent_size": latent_size, "model.token_dropout": p, "model.latent_dropout": p}


@dataclass
class AutoencoderConfig:
    """The context-free chunk autoencoder (paper §3)."""

    vocab_size: int = 128257
    hidden_size: int = 512
    intermediate_size: int = 1280
    num_encoder_layers: int = 2
    num_decoder_layers: int = 2
    latent_size: int = 128
    chunk_size: int = 4
    """K: tokens packed into one latent vector."""
    rms_norm_eps: float = 1e-6
    kl_mode: str = "clipped"
    """off | plain | clipped: no KL term, β·Σ_j KL_j, or β·Σ_j max(λ_KL, KL_j) (paper Eqs. 1-4, Table 2)."""
    kl_weight: float = 1e-3
    """β of the KL term (paper Fig. 6: 1e-3)."""
    kl_clamp: float = 0.5
    """λ_KL: with kl_mode clipped, each latent dimension's KL is clamped from below at this value."""
    token_dropout: float = 0.15
    """DropToken: probability that an input id is replaced by ``drop_token_id`` in training."""
    latent_dropout: float = 0.15
    """DropLatent: inverted dropout on z in training."""
    drop_token_id: int = 0
    """The id a dropped token becomes; the official code uses 0, an ordinary token."""
    init_std: float = 0.02

    # ---- ours, beyond the paper (calm.extensions.context; docs/guides/extensions.md), off by default ----
    context_weight: float = 0.0
    """Weight of an InfoNCE term that pulls each chunk's posterior mean toward the next chunk's, against the
    other chunks of the batch (logits −‖μ_i − μ'_j‖ / τ). Half of each batch is then drawn as usual, the
    other half the chunks that follow them. It gives the latent space the context structure (topic,
    register) that the energy score can reward; the demo uses it with ``token_anchor``."""
    context_tau: float = 4.0
    """τ of the InfoNCE term (used only when ``context_weight`` > 0)."""

    def validate(self) -> None:
        _require(self.vocab_size > 0, f"vocab_size must be positive, got {self.vocab_size}")
        _require(self.chunk_size >= 1, f"chunk_size must be >= 1, got {self.chunk_size}")
        _require(self.latent_size >= 1, f"latent_size must be >= 1, got {self.latent_size}")
        _require(self.hidden_size >= 1, f"hidden_size must be >= 1, got {self.hidden_size}")
        for name in ("num_encoder_layers", "num_decoder_layers"):
            n = getattr(self, name)
            _require(n >= 2 and n % 2 == 0, f"{name} must be an even number >= 2 (two stages), got {n}")
        for name in ("token_dropout", "latent_dropout"):
            p = getattr(self, name)
            _require(0.0 <= p < 1.0, f"{name} must be in [0, 1), got {p}")
        _require(self.kl_mode in KL_MODES, f"kl_mode={self.kl_mode!r} is unknown; choose one of {', '.join(KL_MODES)}")
        _require(self.kl_weight >= 0, f"kl_weight must be >= 0, got {self.kl_weight}")
        _require(self.kl_clamp >= 0, f"kl_clamp must be >= 0, got {self.kl_clamp}")
        _require(
            0 <= self.drop_token_id < self.vocab_size,
            f"drop_token_id={self.drop_token_id} is outside the vocabulary of {self.vocab_size}",
        )
        # ours
        _require(self.context_weight >= 0, f"context_weight must be >= 0, got {self.context_weight}")
        _require(self.context_tau > 0, f"context_tau must be > 0, got {self.context_tau}")


@dataclass
class TransformerConfig:
    """The Llama-style backbone shared by CALM and the token baseline (paper §4, sizes in §7.1)."""

    vocab_size: int = 128257
    hidden_size: int = 1024
    intermediate_size: int = 2752
    num_layers: int = 16
    num_heads: int = 16
    num_kv_heads: int | None = None
    """Grouped-query attention when smaller than ``num_heads``; None means MHA."""
    max_seq_len: int = 2048
    """Context in backbone steps (chunks for CALM, tokens for the baseline)."""
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-6
    init_std: float = 0.02

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_heads(self) -> int:
        return self.num_kv_heads or self.num_heads

    def validate(self) -> None:
        _require(self.vocab_size > 0, f"vocab_size must be positive, got {self.vocab_size}")
        _require(self.num_layers >= 1, f"num_layers must be >= 1, got {self.num_layers}")
        _require(self.num_heads >= 1, f"num_heads must be >= 1, got {self.num_heads}")
        _require(
            self.hidden_size % self.num_heads == 0,
            f"hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}; "
            "pick a head count that divides the width",
        )
        _require(self.head_dim % 2 == 0, f"head_dim={self.head_dim} must be even for RoPE")
        _require(
            self.num_heads % self.kv_heads == 0,
            f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.kv_heads}",
        )
        _require(self.max_seq_len >= 1, f"max_seq_len must be >= 1, got {self.max_seq_len}")


@dataclass
class GPTConfig(TransformerConfig):
    """The token-level baseline: backbone plus an untied LM head (paper §7.1)."""


@dataclass
class CALMConfig(TransformerConfig):
    """CALM: chunk input compression, backbone and energy head (paper §4)."""

    chunk_size: int = 4
    latent_size: int = 128
    noise_size: int = 64
    """Dimension of the uniform noise fed to the energy head."""
    num_head_blocks: int | None = None
    """MLP blocks in the head (energy, flow or diffusion); None means num_layers // 4 (the paper's rule)."""
    num_samples: int = 8
    """N: head samples per position for the energy loss."""
    num_target_samples: int = 100
    """M: posterior samples per position for the energy loss."""
    energy_alpha: float = 1.0
    """Exponent of the distances in the energy score; strictly proper for 0 < alpha < 2."""
    head: str = "energy"
    """energy | flow | diffusion: the generative head and its loss (paper §4.2; flow, diffusion: Figs. 8-9)."""
    flow_steps: int = 4
    """Flow head: midpoint steps per sample (2 head passes each); read at sampling time."""
    diffusion_steps: int = 100
    """Diffusion head: respaced sampling steps (1 head pass each); read at sampling time."""
    diffusion_train_steps: int = 1000
    """Diffusion head: steps of the cosine noise schedule it is trained on."""
    input: str = "discrete"
    """discrete | continuous | both: backbone input from the previous chunk's tokens (embed + MLP), its
    posterior mean latent (Linear), or the sum (paper §4, Table 5)."""

    # ---- ours, beyond the paper (calm.extensions; docs/guides/extensions.md), all off by default ----
    energy_diversity_weight: float = 1.0
    """λ in the score λ·E‖x′ − x″‖^α − 2·E‖x − z‖^α. 1 is the paper's strictly proper energy score; below 1
    (energy head only) the diversity term is weakened, so the loss is no longer proper and its optimum is
    sharper than the data's distribution, as a temperature below 1 would be."""
    energy_mean_weight: float = 0.0
    """Weight λ of an auxiliary energy score with alpha = 2 added to the loss (energy head only). In expectation
    that score is −2‖E[x] − E[z]‖² + const: an unbiased regression of the head's sample mean on the target
    that leaves the spread alone, so the sum stays strictly proper and the optimum unchanged, while the pull
    on the conditional mean grows."""
    token_aux_weight: float = 0.0
    """Weight of an auxiliary cross-entropy that predicts the next chunk's first token from the backbone state
    h through a linear layer (d → vocab) used in training only. It gives the backbone the direct next-token
    signal a token LM gets; its FLOPs count in training (``calm.models.flops``) and it is ignored at
    sampling (unless ``token_anchor``)."""
    token_aux_tokens: int = 1
    """How many tokens of the next chunk the auxiliary readout predicts (1..K), one d → vocab readout each;
    used only when ``token_aux_weight`` > 0."""
    token_anchor: bool = False
    """Anchor each chunk on a discrete first token (energy head only). The auxiliary readout
    (``token_aux_weight`` > 0, ``token_aux_tokens`` 1) becomes part of the model: at sampling it draws the
    chunk's first token from softmax(readout(h)), and the head draws the latent conditioned on h and that
    token's embedding (trained on the true first token). Each step still emits one chunk; its first token
    is chosen the way a token LM chooses one, the rest by the head (``calm.extensions.anchor``). Its
    logged ``energy_loss`` is conditioned on the true first token, so it is not comparable with other
    models'; the head diagnostics draw the token, as sampling does."""
    token_score_weight: float = 0.0
    """Weight of a log score on the next chunk's first token under the head's own samples (energy head only).
    A linear probe (latent → vocab), trained alongside on posterior samples of the true chunks, reads
    ``token_score_samples`` fresh head samples; the term is −log of the probe's mixture probability of the
    true first token, its gradient reaching the head (not the probe). Training only; FLOPs counted."""
    token_score_samples: int = 2
    """Head samples per position in the token score (used only when ``token_score_weight`` > 0)."""

    @property
    def head_blocks(self) -> int:
        return self.num_head_blocks or max(1, self.num_layers // 4)

    def validate(self) -> None:
        super().validate()
        _require(self.chunk_size >= 1, f"chunk_size must be >= 1, got {self.chunk_size}")
        _require(self.latent_size >= 1, f"latent_size must be >= 1, got {self.latent_size}")
        _require(self.noise_size >= 1, f"noise_size must be >= 1, got {self.noise_size}")
        _require(
            self.num_samples >= 2,
            f"num_samples={self.num_samples}: the energy score needs at least 2 model samples",
        )
        _require(self.num_target_samples >= 1, "num_target_samples must be >= 1")
        _require(
            0.0 < self.energy_alpha < 2.0,
            f"energy_alpha={self.energy_alpha}: the energy score is strictly proper only for 0 < alpha < 2",
        )
        _require(self.head in CALM_HEADS, f"head={self.head!r} is unknown; choose one of {', '.join(CALM_HEADS)}")
        _require(self.flow_steps >= 1, f"flow_steps must be >= 1, got {self.flow_steps}")
        _require(
            self.diffusion_train_steps >= 2, f"diffusion_train_steps must be >= 2, got {self.diffusion_train_steps}"
        )
        _require(
            1 <= self.diffusion_steps <= self.diffusion_train_steps,
            f"diffusion_steps={self.diffusion_steps} must be in 1..diffusion_train_steps={self.diffusion_train_steps}",
        )
        _require(self.input in CALM_INPUTS, f"input={self.input!r} is unknown; choose one of {', '.join(CALM_INPUTS)}")
        # ours (calm.extensions)
        _require(self.energy_mean_weight >= 0.0, f"energy_mean_weight must be >= 0, got {self.energy_mean_weight}")
        _require(
            self.energy_mean_weight == 0.0 or self.head == "energy",
            f"energy_mean_weight={self.energy_mean_weight} applies to the energy head only; got head={self.head!r}",
        )
        _require(self.token_aux_weight >= 0.0, f"token_aux_weight must be >= 0, got {self.token_aux_weight}")
        _require(
            1 <= self.token_aux_tokens <= self.chunk_size,
            f"token_aux_tokens must be in 1..chunk_size={self.chunk_size}, got {self.token_aux_tokens}",
        )
        _require(
            not self.token_anchor
            or (self.head == "energy" and self.token_aux_weight > 0 and self.token_aux_tokens == 1),
            "token_anchor needs the energy head and its readout trained: head=energy, token_aux_weight > 0 "
            f"and token_aux_tokens=1 (got head={self.head!r}, token_aux_weight={self.token_aux_weight}, "
            f"token_aux_tokens={self.token_aux_tokens})",
        )
        _require(
            not (self.token_anchor and self.token_score_weight > 0),
            "token_score_weight scores the latent's own first token, which an anchored head (token_anchor) never "
            "emits; use one or the other",
        )
        _require(self.token_score_weight >= 0.0, f"token_score_weight must be >= 0, got {self.token_score_weight}")
        _require(self.token_score_samples >= 1, f"token_score_samples must be >= 1, got {self.token_score_samples}")
        _require(
            self.token_score_weight == 0.0 or self.head == "energy",
            f"token_score_weight={self.token_score_weight} applies to the energy head only; got head={self.head!r}",
        )
        _require(
            0.0 < self.energy_diversity_weight <= 1.0,
            f"energy_diversity_weight must be in (0, 1] (1: the paper's score), got {self.energy_diversity_weight}",
        )
        _require(
            self.energy_diversity_weight == 1.0 or self.head == "energy",
            f"energy_diversity_weight applies to the energy head only; got head={self.head!r}",
        )


EXTENSION_FIELDS: dict[type, tuple[str, ...]] = {
    AutoencoderConfig: ("context_weight", "context_tau"),
    CALMConfig: (
        "energy_diversity_weight",
        "energy_mean_weight",
        "token_aux_weight",
        "token_aux_tokens",
        "token_anchor",
        "token_score_weight",
        "token_score_samples",
    ),
}
"""The model-config fields of the options beyond the paper (ours; ``calm.extensions``), per config class."""

_COMPANIONS = {
    "context_tau": "context_weight",
    "token_aux_tokens": "token_aux_weight",
    "token_score_samples": "token_score_weight",
}
"""Extension fields that only matter when another one turns the option on."""


def extensions_in_use(config: Any) -> list[str]:
    """``name=value`` of each option of ours (beyond the paper) that ``config`` turns on, in field order.

    A field counts when it differs from its default; a companion field (``context_tau``,
    ``token_aux_tokens``, ``token_score_samples``) only when its option is on too. An empty list means
    the paper's model.
    """
    default = type(config)()

    def changed(name: str) -> bool:
        return getattr(config, name) != getattr(default, name)

    names = EXTENSION_FIELDS.get(type(config), ())
    return [
        f"{n}={getattr(config, n)}" for n in names if changed(n) and (n not in _COMPANIONS or changed(_COMPANIONS[n]))
    ]


@dataclass
class TrainConfig:
    """The optimisation recipe shared by every stage (paper §7.1)."""

    lr: float = 3e-4
    lr_schedule: str = "constant"
    """constant | cosine | linear: the shape after warm-up."""
    warmup_steps: int = 0
    min_lr_ratio: float = 0.1
    """For cosine/linear decay: the final learning rate as a fraction of ``lr``."""
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    batch_tokens: int = 524288
    """Global batch per optimizer step, in tokens."""
    micro_batch_tokens: int | None = None
    """Tokens per forward pass on one rank; gradient accumulation is derived. None: no accumulation."""
    block_size: int = 2048
    """Tokens per training sequence (the AE ignores sequence structure)."""
    max_steps: int = 30000
    max_minutes: float | None = None
    """Stop early after this many minutes of training (the step count still sets the schedule)."""
    eval_every: int = 1000
    eval_tokens: int = 65536
    log_every: int = 10
    save_every: int = 1000
    keep_checkpoints: int = 2
    seed: int = 1
    precision: str = "auto"
    """auto | fp32 | bf16 (autocast). auto: bf16 where the device runs it fast, else fp32 (``calm.hardware``)."""
    compile: bool = False
    activation_checkpointing: bool = False
    """Recompute each backbone block's activations in the backward pass instead of keeping them: less
    memory for long contexts and large models, about a third more compute; the same gradients."""
    fused_optimizer: str = "auto"
    """auto | on | off: the fused AdamW kernel (one kernel for all parameters). auto: on for CUDA, off
    elsewhere (on CPU it rounds differently from the default, so earlier CPU runs stay reproducible)."""
    skip_nonfinite: bool = False
    """Skip an optimizer step whose loss or gradient is not finite instead of stopping."""

    def grad_accum_steps(self, world_size: int = 1) -> int:
        micro = self.micro_batch_tokens or self.batch_tokens // world_size
        per_step = micro * world_size
        _require(
            self.batch_tokens % per_step == 0,
            f"batch_tokens={self.batch_tokens} is not a multiple of micro_batch_tokens={micro} x "
            f"world_size={world_size}; choose sizes that divide",
        )
        return self.batch_tokens // per_step

    def validate(self, world_size: int = 1) -> None:
        _require(self.lr > 0, f"lr must be positive, got {self.lr}")
        _require(self.lr_schedule in ("constant", "cosine", "linear"), f"unknown lr_schedule {self.lr_schedule!r}")
        _require(self.warmup_steps >= 0, "warmup_steps must be >= 0")
        _require(self.max_steps >= 1, f"max_steps must be >= 1, got {self.max_steps}")
        _require(self.batch_tokens >= 1, f"batch_tokens must be >= 1, got {self.batch_tokens}")
        _require(self.block_size >= 1, f"block_size must be >= 1, got {self.block_size}")
        _require(
            self.precision in ("auto", "fp32", "bf16"), f"precision must be auto, fp32 or bf16, got {self.precision!r}"
        )
        _require(self.eval_every >= 1 and self.save_every >= 1 and self.log_every >= 1, "intervals must be >= 1")
        _require(self.keep_checkpoints >= 1, "keep_checkpoints must be >= 1")
        _require(
            self.fused_optimizer in ("auto", "on", "off"),
            f"fused_optimizer must be auto, on or off, got {self.fused_optimizer!r}",
        )
        self.grad_accum_steps(world_size)


MODEL_CONFIGS: dict[str, type] = {
    "autoencoder": AutoencoderConfig,
    "calm": CALMConfig,
    "gpt": GPTConfig,
}


_TYPE_WORDS = {bool: "a boolean (true/false)", int: "an integer", float: "a number", str: "a string"}


def _coerce(cls: type, name: str, value: Any, section: str) -> Any:
    """``value`` as the declared type of field ``name`` of ``cls``, or a ConfigError naming both.

    Integers are accepted for float fields and integral floats (``1e6``) for int fields; booleans
    are never numbers; None only where the field is optional.
    """
    hint = typing.get_type_hints(cls)[name]
    optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in typing.get_args(hint)
    base = next(a for a in typing.get_args(hint) if a is not type(None)) if optional else hint
    if value is None and optional:
        return None
    if base is bool and isinstance(value, bool):
        return value
    if base is int and not isinstance(value, bool):
        if isinstance(value, int):
            return value
        if isinstance(value, float) and math.isfinite(value) and value.is_integer():
            return int(value)
    if base is float and isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if base is str and isinstance(value, str):
        return value
    expected = _TYPE_WORDS.get(base, getattr(base, "__name__", str(base))) + (" or null" if optional else "")
    key = f"{section}.{name}" if section else name
    raise ConfigError(f"{key}={value!r} is not valid: {cls.__name__}.{name} expects {expected}")


def config_from_dict(cls: type, values: dict[str, Any], section: str = "") -> Any:
    """Build a dataclass, naming any unknown key or wrongly typed value instead of a bare TypeError.

    ``section`` (``model`` / ``train``) prefixes the key in messages, as the user wrote it.
    """
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"unknown {cls.__name__} keys {unknown}; known keys are {sorted(known)}")
    return cls(**{name: _coerce(cls, name, value, section) for name, value in values.items()})


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


@dataclass
class Preset:
    name: str
    model: Any
    train: TrainConfig
    extra: dict[str, Any] = field(default_factory=dict)


def preset_names(kind: str) -> list[str]:
    return list(_load_presets(kind))


def _load_presets(kind: str) -> dict[str, Any]:
    path = CONFIG_DIR / f"{kind}.yaml"
    if not path.exists():
        raise ConfigError(f"no presets for model kind {kind!r}; expected {path}")
    with open(path) as f:
        return yaml.safe_load(f)


def load_preset(kind: str, name: str, overrides: dict[str, Any] | None = None) -> Preset:
    """Return the named preset of ``kind`` (autoencoder | calm | gpt).

    ``overrides`` maps ``model.key`` / ``train.key`` (or a bare train key) to values.
    """
    presets = _load_presets(kind)
    if name not in presets:
        raise ConfigError(f"unknown {kind} preset {name!r}; choose one of {sorted(presets)}")
    raw = presets[name]
    model_values = dict(raw.get("model", {}))
    train_values = dict(raw.get("train", {}))
    for key, value in (overrides or {}).items():
        section, _, sub = key.partition(".")
        if section == "model" and sub:
            model_values[sub] = value
        elif section == "train" and sub:
            train_values[sub] = value
        else:
            train_values[key] = value
    model = config_from_dict(MODEL_CONFIGS[kind], model_values, "model")
    train = config_from_dict(TrainConfig, train_values, "train")
    extra = {k: v for k, v in raw.items() if k not in ("model", "train")}
    return Preset(name=name, model=model, train=train, extra=extra)


def parse_override(text: str) -> tuple[str, Any]:
    """Parse ``key=value`` with the value read as YAML (numbers, bools, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like key=value, e.g. train.lr=1e-3")
    key, value = text.split("=", 1)
    parsed = yaml.safe_load(value)
    if isinstance(parsed, bool) and value.strip().lower() not in ("true", "false"):
        parsed = value.strip()  # YAML 1.1 reads on/off/yes/no as booleans: model.kl_mode=off is the word
    if isinstance(parsed, str):  # YAML 1.1 reads "1e-3" as a string
        try:
            parsed = float(parsed)
        except ValueError:
            pass
    return key.strip(), parsed


_FROM_TOKENIZER = (
    "it is the vocabulary size of the data's tokenizer (DIR/tokenizer.json of --data); choose it when "
    "preparing the data (`calm prepare --out NEW_DIR --vocab-size N`, with your --corpus)"
)
DERIVED_FIELDS: dict[str, dict[str, str]] = {
    "autoencoder": {
        "model.vocab_size": _FROM_TOKENIZER,
        "train.block_size": (
            "the autoencoder trains on single chunks of model.chunk_size tokens and never reads it; "
            "set train.batch_tokens for the batch size"
        ),
    },
    "calm": {
        "model.vocab_size": _FROM_TOKENIZER,
        "model.chunk_size": (
            "it is K of the frozen autoencoder (--autoencoder); train an autoencoder with "
            "`calm train-ae --data DIR --out NEW_DIR --set model.chunk_size=N` to change it"
        ),
        "model.latent_size": (
            "it is the latent size of the frozen autoencoder (--autoencoder); train an autoencoder with "
            "`calm train-ae --data DIR --out NEW_DIR --set model.latent_size=N` to change it"
        ),
    },
    "gpt": {"model.vocab_size": _FROM_TOKENIZER},
}
"""Per training kind: the override keys whose value a run takes from another artefact (or never reads),
and where the value comes from. A stage (``calm.train.stages``) builds the model config it runs from the
user's with ``dataclasses.replace``, putting the data's and the autoencoder's values in these fields, so
an override of one of them would be silently replaced: ``check_overrides`` refuses it. Tests check that
the ``model.*`` keys here are exactly the fields in which a stage's ``config`` differs from the one given."""


def check_overrides(kind: str, overrides: dict[str, Any] | None) -> None:
    """Refuse overrides that a ``kind`` training run would replace or ignore (``DERIVED_FIELDS``).

    ``overrides`` maps ``section.key`` (or a bare ``key``, read as ``train.key``) to a value, as ``--set``
    gives them. Raises ``ConfigError`` naming the override and where the run takes that value from, so
    that the user changes it at its source (``calm prepare --vocab-size``, ``calm train-ae --set ...``).
    """
    for key, value in (overrides or {}).items():
        full = key if "." in key else f"train.{key}"
        reason = DERIVED_FIELDS.get(kind, {}).get(full)
        if reason is not None:
            raise ConfigError(f"--set {full}={value!r} cannot be applied to {kind} training: {reason}")
