"""Self-contained checkpoint directories: save, validate, load, resume. No pickle anywhere.

A checkpoint is one directory::

    config.json            kind, model config (and the embedded autoencoder's for CALM),
                           tokenizer sha256, file sizes, format version, run metadata
    model.safetensors      weights (a CALM checkpoint embeds its frozen autoencoder)
    tokenizer.json         the tokenizer the model was trained with
    training_state.json    step, data position, RNG states, optimizer hyper-parameters
    training_state.safetensors   optimizer moments and RNG byte states

A training run keeps its checkpoints as ``RUN/checkpoints/step_NNNNNNNN/``. Each is written into a
temporary directory and renamed into place, so a directory that exists is complete; older ones are
pruned only after a newer one is in place. ``resolve_checkpoint(RUN)`` picks the newest, so a run
directory and a checkpoint directory are both accepted wherever a checkpoint is expected.
"""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from calm.config import AutoencoderConfig, CALMConfig, ConfigError, GPTConfig, config_from_dict
from calm.data.tokenizer import Tokenizer
from calm.extensions import build_calm
from calm.hardware import bf16_is_fast, int8_matmul_is_fast
from calm.io import JSONFileError, atomic_directory, read_json, recover_directories, remove_directory, write_json
from calm.models.autoencoder import Autoencoder
from calm.models.calm import CALM
from calm.models.gpt import GPT
from calm.models.lora import LoraOptions, add_lora
from calm.models.vocab_search import ArgmaxScreens

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
STATE_JSON = "training_state.json"
STATE_TENSORS = "training_state.safetensors"
CHECKPOINT_SUBDIR = "checkpoints"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt or does not fit; the message says how to fix it."""


# ----------------------------------------------------------------------------- training state


def optimizer_state_to_tensors(
    optimizer: torch.optim.Optimizer | dict[str, Any],
) -> tuple[dict[str, torch.Tensor], dict]:
    """Split an optimizer (or its state_dict) into flat tensors (for safetensors) and a JSON-able rest."""
    sd = optimizer if isinstance(optimizer, dict) else optimizer.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"optimizer.{idx}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[key] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_state_from_tensors(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if not name.startswith("optimizer."):
            continue
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    for idx, extra in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(extra)
    return {"state": state, "param_groups": meta["param_groups"]}


def capture_rng_state() -> tuple[dict[str, torch.Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    np_state = np.random.get_state()
    meta = {
        "python": _to_jsonable(random.getstate()),
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
    }
    return tensors, meta


def restore_rng_state(tensors: dict[str, torch.Tensor], meta: dict) -> None:
    if "rng.torch" in tensors:
        torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(cuda[: torch.cuda.device_count()])
    if "python" in meta:
        random.setstate(_to_tuple(meta["python"]))
    if "numpy" in meta:
        name, keys, *rest = meta["numpy"]
        np.random.set_state((name, np.array(keys, dtype=np.uint32), *rest))


def _to_jsonable(x: Any) -> Any:
    if isinstance(x, tuple | list):
        return [_to_jsonable(v) for v in x]
    return x


def _to_tuple(x: Any) -> Any:
    if isinstance(x, list):
        return tuple(_to_tuple(v) for v in x)
    return x


# ----------------------------------------------------------------------------- save


def save_checkpoint(
    path: str | Path,
    *,
    model: nn.Module,
    config: dict[str, Any],
    tokenizer_json: str,
    training_state: dict[str, Any] | None = None,
    optimizer: torch.optim.Optimizer | dict[str, Any] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write a complete checkpoint directory at ``path`` atomically and return it.

    ``config`` must contain ``kind`` and ``model`` (plus anything else worth recording). The
    directory appears only once every file is written and flushed to disk; an existing ``path`` is
    replaced only after the new one is complete (``calm.io.atomic_directory``). A failed write (full
    disk, SIGKILL) leaves at most hidden ``.NAME.tmp-*`` / ``.NAME.old-*`` directories, which
    ``list_checkpoints`` ignores and ``clean_incomplete`` removes or moves back. ``weights`` / an
    optimizer state dict, when given, replace ``model.state_dict()`` / ``optimizer.state_dict()``
    (FSDP gathers them on every rank first).
    """
    with atomic_directory(path) as tmp:
        source = weights if weights is not None else _unwrapped_state_dict(model)
        weights = {k: v.detach().cpu().contiguous() for k, v in source.items()}
        save_file(weights, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        (tmp / TOKENIZER_FILE).write_text(tokenizer_json, encoding="utf-8")
        if training_state is not None:
            tensors, rng_meta = capture_rng_state()
            opt_meta: dict = {}
            if optimizer is not None:
                opt_tensors, opt_meta = optimizer_state_to_tensors(optimizer)
                tensors.update(opt_tensors)
            save_file(tensors, str(tmp / STATE_TENSORS))
            write_json(tmp / STATE_JSON, {**training_state, "rng": rng_meta, "optimizer": opt_meta}, sort_keys=True)
        files = {p.name: p.stat().st_size for p in tmp.iterdir()}
        full_config = {**config, "format_version": FORMAT_VERSION, "files": files}
        write_json(tmp / CONFIG_FILE, full_config, sort_keys=True)
    return Path(path)


def _unwrapped_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without the ``module.`` / ``_orig_mod.`` prefixes that DDP and compile add."""
    sd = model.state_dict()
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix) :]
        k = k.replace("._orig_mod.", ".")
        out[k] = v
    return out


def checkpoint_step_dir(run_dir: str | Path, step: int) -> Path:
    return Path(run_dir) / CHECKPOINT_SUBDIR / f"step_{step:08d}"


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary directories are ignored)."""
    root = Path(run_dir) / CHECKPOINT_SUBDIR
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / CONFIG_FILE).exists()]
    return sorted(found, key=lambda p: int(p.name.split("_")[1]))


def prune_checkpoints(run_dir: str | Path, keep: int) -> None:
    """Delete all but the newest ``keep`` checkpoints, and leftovers of interrupted writes.

    A checkpoint is first renamed to a hidden ``.NAME.del-*`` directory and then deleted, so a
    crash half-way through the deletion never leaves a partial ``step_*`` directory behind.
    """
    for old in list_checkpoints(run_dir)[:-keep]:
        try:
            remove_directory(old)
        except OSError:  # gone already (another process pruned it): nothing to do
            continue
    clean_incomplete(run_dir)


def clean_incomplete(run_dir: str | Path) -> None:
    """Remove what interrupted writes and deletions left in ``RUN/checkpoints``.

    A ``.NAME.old-*`` directory is the previous complete ``NAME`` that ``save_checkpoint`` moved
    aside while replacing it; if the replacement never arrived, it is moved back. ``.NAME.tmp-*``
    (an interrupted write) and ``.NAME.del-*`` (an interrupted deletion) are removed
    (``calm.io.recover_directories``).
    """
    recover_directories(Path(run_dir) / CHECKPOINT_SUBDIR, is_complete=lambda p: (p / CONFIG_FILE).is_file())


def resolve_checkpoint(path: str | Path) -> Path:
    """Accept a checkpoint directory or a run directory (then its newest checkpoint)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; pass a checkpoint or run directory")
    if (path / CONFIG_FILE).exists():
        return path
    ckpts = list_checkpoints(path)
    if ckpts:
        return ckpts[-1]
    raise CheckpointError(
        f"{path} holds no checkpoint: expected {CONFIG_FILE} in it or a {CHECKPOINT_SUBDIR}/step_* directory "
        "(was the training run started?)"
    )


# ----------------------------------------------------------------------------- load


def read_config(ckpt_dir: str | Path) -> dict[str, Any]:
    ckpt_dir = resolve_checkpoint(ckpt_dir)
    cfg_path = ckpt_dir / CONFIG_FILE
    try:
        config = read_json(cfg_path)
    except JSONFileError as e:
        raise CheckpointError(f"{e.problem}; the checkpoint is corrupt, pick another one") from e
    except OSError as e:
        raise CheckpointError(f"{cfg_path} is unreadable ({e}); the checkpoint is corrupt") from e
    if not isinstance(config, dict) or "kind" not in config or "model" not in config:
        raise CheckpointError(f"{cfg_path} lacks 'kind' or 'model'; it is not a calm checkpoint")
    version = config.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(
            f"{cfg_path} has format_version={version}, this calm reads {FORMAT_VERSION}; "
            "use the calm version that wrote it"
        )
    for name, size in config.get("files", {}).items():
        f = ckpt_dir / name
        if not f.exists():
            raise CheckpointError(f"{f} is missing; the checkpoint is incomplete, pick another one")
        if f.stat().st_size != size:
            raise CheckpointError(
                f"{f} has {f.stat().st_size} bytes but the checkpoint recorded {size}; "
                "the file is truncated or was replaced, pick another checkpoint"
            )
    return config


CAST_CHUNK_BYTES = 256 * 2**20
"""A load that casts (``dtype``) maps this much of the file at a time, so that the pages read for the
cast are released as it goes and never all count at once."""

_SAFETENSORS_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}


def load_weights(
    ckpt_dir: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors, read from the memory-mapped file onto ``device``.

    Without ``dtype`` the file is mapped once and the tensors are read lazily (on the CPU, a page is
    read when first used, so loading costs about nothing until the model runs). With ``dtype``,
    floating-point tensors are cast as they are read, ``CAST_CHUNK_BYTES`` of the file at a time, so a
    bf16 load of fp32 weights holds the bf16 weights and one chunk, never the fp32 weights whole.
    """
    path = resolve_checkpoint(ckpt_dir) / WEIGHTS_FILE
    if not path.exists():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete")
    try:
        with safe_open(str(path), framework="pt", device=str(device)) as f:
            if dtype is None:
                return {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (not a mapping)
            chunks, size = [[]], 0
            for key in f.keys():  # noqa: SIM118
                part = f.get_slice(key)
                nbytes = math.prod(part.get_shape()) * _SAFETENSORS_BYTES.get(part.get_dtype(), 4)
                if size + nbytes > CAST_CHUNK_BYTES and chunks[-1]:
                    chunks.append([])
                    size = 0
                chunks[-1].append(key)
                size += nbytes
        weights = {}
        for keys in chunks:
            with safe_open(str(path), framework="pt", device=str(device)) as f:
                for key in keys:
                    tensor = f.get_tensor(key)
                    weights[key] = tensor.to(dtype) if tensor.is_floating_point() else tensor
        return weights
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is corrupt or truncated ({e}); pick another checkpoint") from e


def load_state_into(
    model: nn.Module, weights: dict[str, torch.Tensor], source: str | Path, assign: bool = False
) -> None:
    """load_state_dict(strict) with messages that name the keys and shapes that differ.

    ``assign=True`` makes the given tensors the model's parameters (no copy), for a model built on the
    meta device; the parameters keep their ``requires_grad``.
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(weights))
    unexpected = sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{source}: weights do not match the model (missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}); the config and weights disagree"
        )
    for k, v in weights.items():
        if expected[k].shape != v.shape:
            raise CheckpointError(
                f"{source}: {k} has shape {tuple(v.shape)} but the model expects {tuple(expected[k].shape)}"
            )
    model.load_state_dict(weights, strict=True, assign=assign)


def read_tokenizer_json(ckpt_dir: str | Path, expected_sha256: str | None = None) -> str:
    path = resolve_checkpoint(ckpt_dir) / TOKENIZER_FILE
    if not path.exists():
        raise CheckpointError(f"{path} is missing; the checkpoint is incomplete")
    text = path.read_text(encoding="utf-8")
    if expected_sha256 is not None:
        sha = Tokenizer.from_str(text).sha256
        if sha != expected_sha256:
            raise CheckpointError(
                f"{path} has sha256 {sha[:12]}… but the model was trained with {expected_sha256[:12]}…; "
                "the tokenizer was replaced, restore the original tokenizer.json"
            )
    return text


def load_training_state(ckpt_dir: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    ckpt_dir = resolve_checkpoint(ckpt_dir)
    jpath, tpath = ckpt_dir / STATE_JSON, ckpt_dir / STATE_TENSORS
    if not jpath.exists() or not tpath.exists():
        raise CheckpointError(f"{ckpt_dir} has no training state; it cannot be resumed (only evaluated)")
    try:
        meta = read_json(jpath)
        tensors = load_file(str(tpath))
    except (OSError, JSONFileError, SafetensorError, ValueError) as e:
        raise CheckpointError(f"training state in {ckpt_dir} is corrupt ({e}); resume from an older checkpoint") from e
    return meta, tensors


# ----------------------------------------------------------------------------- models


def fast_argmax_screens(device: torch.device) -> ArgmaxScreens:
    """The exact vocabulary-argmax screens ``device`` runs fast (``calm.hardware``: bf16 where bf16 matmuls are
    fast, int8 where ``torch._int_mm`` is at least twice the fp32 rate, as with VNNI); both give the reference
    argmax exactly, so they change decoding speed only (not the FLOPs of paper Table 1)."""
    return ArgmaxScreens(bf16=device.type == "cpu" and bf16_is_fast(device), int8=int8_matmul_is_fast(device))


def use_fast_argmax(model: nn.Module) -> nn.Module:
    """Let ``model``'s autoencoder (itself, or a CALM's frozen one) decode through :func:`fast_argmax_screens`;
    returns ``model``. :func:`load_model` does this for every checkpoint it loads."""
    ae = getattr(model, "autoencoder", model)
    if isinstance(ae, Autoencoder):
        ae.argmax_screens = fast_argmax_screens
    return model


def load_model(
    ckpt_dir: str | Path,
    device: str | torch.device = "cpu",
    kind: str | None = None,
    dtype: torch.dtype | None = None,
) -> tuple[Autoencoder | CALM | GPT, Tokenizer, dict[str, Any]]:
    """Load any calm checkpoint -> (model in eval mode, Tokenizer, config dict).

    The model is built on the meta device (no random initialisation, no memory) and the checkpoint's
    tensors become its parameters as they are read, so the peak memory is about the size of the
    weights. ``dtype`` (e.g. ``torch.bfloat16``) casts the floating-point weights while reading; the
    default keeps the checkpoint's. ``kind`` (autoencoder | calm | gpt), when given, is checked against
    the checkpoint's. A checkpoint of a LoRA fine-tune (``config["finetune"]["lora"]``) comes back with
    its adapters merged (``calm.models.lora``).
    """
    ckpt_dir = resolve_checkpoint(ckpt_dir)
    config = read_config(ckpt_dir)
    if kind is not None and config["kind"] != kind:
        found = config["kind"]
        needed = f"{indefinite_article(kind)} {kind}"
        raise CheckpointError(
            f"{ckpt_dir} is {indefinite_article(found)} {found} checkpoint but {needed} checkpoint is needed here"
        )
    tokenizer = Tokenizer.from_str(read_tokenizer_json(ckpt_dir, config.get("tokenizer_sha256")))
    lora = (config.get("finetune") or {}).get("lora")
    with torch.device("meta"):
        model = build_model(config, ckpt_dir)
        target = add_lora(model, LoraOptions(**lora)) if lora else model  # a LoRA fine-tune: adapters saved
    if tokenizer.vocab_size != model.config.vocab_size:
        raise CheckpointError(
            f"{ckpt_dir}: tokenizer.json has {tokenizer.vocab_size} tokens but the model was built for "
            f"{model.config.vocab_size}; use the tokenizer the model was trained with"
        )
    load_state_into(target, load_weights(ckpt_dir, device, dtype), ckpt_dir, assign=True)
    for module in model.modules():  # tables no checkpoint holds (rotary, noise schedule)
        if hasattr(module, "init_buffers"):
            module.init_buffers(device)
    if lora:
        model = target.merge_and_unload()  # the plain model, adapters merged into its weights
    model.eval()
    use_fast_argmax(model)
    return model, tokenizer, config


def build_model(config: dict[str, Any], source: str | Path = "the checkpoint") -> Autoencoder | CALM | GPT:
    """The model a checkpoint's ``config.json`` describes, with fresh weights (on the current default device;
    :func:`load_model` builds on the meta device). Raises CheckpointError for an unknown kind or an
    impossible config."""
    try:
        if config["kind"] == "autoencoder":
            return Autoencoder(config_from_dict(AutoencoderConfig, config["model"]))
        if config["kind"] == "calm":
            ae = Autoencoder(config_from_dict(AutoencoderConfig, config["autoencoder"]))
            return build_calm(config_from_dict(CALMConfig, config["model"]), ae)
        if config["kind"] == "gpt":
            return GPT(config_from_dict(GPTConfig, config["model"]))
    except (ConfigError, ValueError) as e:
        raise CheckpointError(f"{source}/config.json describes an impossible model: {e}") from e
    raise CheckpointError(f"{source}: unknown checkpoint kind {config['kind']!r}")


def indefinite_article(word: str) -> str:
    """The indefinite article for ``word`` ("an autoencoder", "a calm")."""
    return "an" if word[:1].lower() in "aeiou" else "a"
