"""``calm convert``: the authors' released checkpoints -> self-contained calm checkpoints.

Reads an official CALM-Autoencoder or CALM-M/L/XL folder (``shaochenze/calm`` layout; paper §3-§4)
from disk or from the Hugging Face hub, maps it onto our modules (``calm.interop.official``), attaches
the paper's tokenizer (Llama 3 + ``[PAD]``, paper §7.1) and writes one checkpoint directory that
``load_model`` and every command accept.

Weights are read without unpickling code: ``torch.load(weights_only=True)`` for ``pytorch_model.bin``
(single or sharded with ``pytorch_model.bin.index.json``) or ``safetensors`` for
``model.safetensors``. Everything is checked before anything is written, and the output appears
atomically (``save_checkpoint``), so a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import json
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from calm.checkpoint import save_checkpoint
from calm.data.corpus import CorpusError
from calm.data.tokenizer import Tokenizer, TokenizerError, load_tokenizer
from calm.interop.official import ConvertError, convert_autoencoder, convert_calm, detect_kind

HUB_PREFIX = "hf:"
HUB_FILES = [
    "config.json",
    "pytorch_model.bin",
    "pytorch_model-*.bin",
    "pytorch_model.bin.index.json",
    "model.safetensors",
    "model-*.safetensors",
    "model.safetensors.index.json",
]
RELEASED = {
    "cccczshao/CALM-Autoencoder": "autoencoder",
    "cccczshao/CALM-M": "calm",
    "cccczshao/CALM-L": "calm",
    "cccczshao/CALM-XL": "calm",
}


@dataclass
class Conversion:
    """What ``convert`` wrote: the checkpoint path, its kind and notes worth telling the user."""

    path: Path
    kind: str
    num_tensors: int
    dtype: str
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------- source


def resolve_source(source: str | Path, cache_dir: str | Path | None = None) -> Path:
    """A local folder, or ``hf:REPO_ID[@REVISION]`` downloaded into the hub cache -> the folder.

    Needs the optional ``huggingface_hub`` (``pip install 'calm-lm[hub]'``) only for ``hf:``. Raises
    ConvertError saying what to install or download by hand when that or the network is missing.
    """
    text = str(source)
    if not text.startswith(HUB_PREFIX):
        path = Path(text)
        if not path.is_dir():
            raise ConvertError(
                f"{path} is not a folder; pass the folder of an official checkpoint (config.json + "
                "pytorch_model.bin or model.safetensors) or hf:REPO_ID, e.g. hf:cccczshao/CALM-M"
            )
        return path
    repo, _, revision = text[len(HUB_PREFIX) :].partition("@")
    by_hand = (
        f"or download config.json and the weights (pytorch_model*.bin [+ index] or model.safetensors) from "
        f"https://huggingface.co/{repo}/tree/{revision or 'main'} into a folder and pass that folder"
    )
    if not repo or repo.count("/") != 1:
        raise ConvertError(f"{text!r} is not hf:OWNER/NAME[@REVISION], e.g. hf:cccczshao/CALM-M")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ConvertError(
            f"{text} needs the optional dependency huggingface_hub: pip install 'calm-lm[hub]' "
            f"(or pip install huggingface_hub), {by_hand}"
        ) from None
    try:
        folder = snapshot_download(
            repo, revision=revision or None, allow_patterns=HUB_FILES, cache_dir=str(cache_dir) if cache_dir else None
        )
    except Exception as e:  # offline, unknown repo or revision, gated, HTTP errors: all end here
        raise ConvertError(
            f"could not fetch {repo}{'@' + revision if revision else ''} from the Hugging Face hub "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); check the network and the "
            f"repository name, {by_hand}"
        ) from None
    return Path(folder)


# ----------------------------------------------------------------------------- reading


def _torch_load(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a torch.save file, never executing pickled code (weights_only)."""
    if not path.is_file():
        raise ConvertError(f"{path} is missing; download it again (every shard named in the index is needed)")
    try:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            sd = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except pickle.UnpicklingError as e:
        raise ConvertError(
            f"{path} holds more than tensors and was refused without unpickling it ({str(e).splitlines()[0]}); "
            "it is not an official state dict"
        ) from None
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile) as e:
        raise ConvertError(
            f"{path} cannot be read as a PyTorch state dict ({str(e).splitlines()[0]}); it is truncated or "
            "corrupt: download it again"
        ) from None
    if not isinstance(sd, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in sd.items()):
        raise ConvertError(f"{path} does not hold a state dict (name -> tensor); it is not an official checkpoint")
    return sd


def _safetensors_load(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise ConvertError(f"{path} is missing; download it again (every shard named in the index is needed)")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ConvertError(f"{path} is truncated or corrupt ({e}); download it again") from None


def _read_sharded(index_path: Path, loader: Callable[[Path], dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConvertError(f"{index_path} is not a valid shard index ({e}); download it again") from None
    sd: dict[str, torch.Tensor] = {}
    for shard in sorted(set(weight_map.values())):
        part = loader(index_path.parent / shard)
        listed = {k for k, v in weight_map.items() if v == shard}
        if not listed <= set(part):
            lost = sorted(listed - set(part))[:5]
            raise ConvertError(f"{shard} lacks {lost}, which {index_path.name} places there; download it again")
        sd.update({k: part[k] for k in listed})
    return sd


def read_official(folder: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor], str]:
    """config.json, the full state dict and the weight file's name, from an official folder.

    Prefers safetensors over ``.bin`` when both are present. Raises ConvertError naming the missing,
    truncated or foreign file.
    """
    folder = Path(folder)
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ConvertError(
            f"{folder} has no config.json; pass the folder of an official CALM or CALM-Autoencoder checkpoint"
        )
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as e:
        raise ConvertError(f"{cfg_path} is not valid JSON ({e}); download it again") from None
    if not isinstance(config, dict):
        raise ConvertError(f"{cfg_path} is not a JSON object; download it again")
    candidates = [
        ("model.safetensors.index.json", lambda p: _read_sharded(p, _safetensors_load)),
        ("model.safetensors", _safetensors_load),
        ("pytorch_model.bin.index.json", lambda p: _read_sharded(p, _torch_load)),
        ("pytorch_model.bin", _torch_load),
    ]
    for name, loader in candidates:
        if (folder / name).is_file():
            return config, loader(folder / name), name
    raise ConvertError(
        f"{folder} has config.json but no weights: expected pytorch_model.bin, pytorch_model.bin.index.json "
        "with its shards, or model.safetensors; download them into the folder"
    )


# ----------------------------------------------------------------------------- tokenizer


def attach_tokenizer(spec: str | Path, config: dict[str, Any], vocab_size: int, kind: str) -> Tokenizer:
    """The tokenizer to ship: ``llama3`` (the paper's, rebuilt from PyPI) or a tokenizer.json path.

    Checks its size against the embedding rows and its BOS/EOS/PAD ids against config.json's.
    """
    try:
        tok = load_tokenizer(spec)
    except (TokenizerError, CorpusError, OSError) as e:
        raise ConvertError(
            f"cannot get the tokenizer {str(spec)!r}: {e}. Alternatively pass --tokenizer PATH with the Llama-3 "
            "tokenizer.json (e.g. llama3_tokenizer/tokenizer.json of github.com/shaochenze/calm; [PAD] is appended)"
        ) from None
    if tok.vocab_size != vocab_size:
        raise ConvertError(
            f"the tokenizer {str(spec)!r} has {tok.vocab_size} tokens but the {kind} embeds {vocab_size}; the "
            "released models use Llama 3 + [PAD] (128,257 tokens): pass --tokenizer llama3 or the matching file"
        )
    for name, ours in (("bos_token_id", tok.bos_id), ("eos_token_id", tok.eos_id), ("pad_token_id", tok.pad_id)):
        stated = config.get(name)
        if isinstance(stated, int) and stated != ours:
            raise ConvertError(
                f"config.json has {name}={stated} but the tokenizer {str(spec)!r} puts it at {ours}; "
                "pass the tokenizer the model was trained with"
            )
    return tok


# ----------------------------------------------------------------------------- convert


def convert(
    source: str | Path,
    out: str | Path,
    *,
    tokenizer: str | Path = "llama3",
    kind: str | None = None,
    overwrite: bool = False,
    cache_dir: str | Path | None = None,
) -> Conversion:
    """Convert an official checkpoint (folder or ``hf:REPO_ID[@REVISION]``) into a calm checkpoint at ``out``.

    The result holds ``config.json``, ``model.safetensors`` (same dtype as the source; a CALM embeds
    its autoencoder) and ``tokenizer.json``; load it with ``calm.checkpoint.load_model``. Raises
    ConvertError (a ValueError) with the cause and the fix; nothing is written unless every check
    passed. ``out`` must not exist unless ``overwrite``. ``kind`` (``autoencoder`` | ``calm``), when
    given, is what the source must hold; for the released ``hf:`` repositories it is known anyway.
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConvertError(f"{out} already exists; pass --overwrite to replace it, or choose another --out")
    folder = resolve_source(source, cache_dir)
    config, state, weight_file = read_official(folder)
    found = detect_kind(config, state)
    kind = kind or RELEASED.get(str(source)[len(HUB_PREFIX) :].partition("@")[0])
    if kind is not None and kind != found:
        wanted = "a CALM (CALM-M/L/XL)" if kind == "calm" else "a CALM-Autoencoder"
        raise ConvertError(
            f"{source} holds {'a CALM-Autoencoder' if found == 'autoencoder' else 'a CALM'}, not {wanted}; "
            f"pass the {'CALM-M/L/XL' if kind == 'calm' else 'CALM-Autoencoder'} folder instead"
        )
    kind = found
    dtypes = sorted({str(v.dtype).removeprefix("torch.") for v in state.values()})
    notes = [f"read {folder / weight_file} ({len(state)} tensors, {'/'.join(dtypes)})"]
    if kind == "autoencoder":
        ae_cfg, weights = convert_autoencoder(config, state)
        model_cfg, vocab = {"model": asdict(ae_cfg)}, ae_cfg.vocab_size
    else:
        calm_cfg, ae_cfg, weights = convert_calm(config, state)
        model_cfg, vocab = {"model": asdict(calm_cfg), "autoencoder": asdict(ae_cfg)}, calm_cfg.vocab_size
        if config.get("ae_path"):
            notes.append(f"ignored ae_path={config['ae_path']!r}: the autoencoder embedded in the file is used")
        pad = config.get("pad_token_id")
        if isinstance(pad, int) and 0 <= pad < vocab and float(weights["embed_tokens.weight"][pad].abs().max()) > 0:
            notes.append(f"warning: embedding row {pad} ([PAD], padding_idx in training) is not zero")
    tok = attach_tokenizer(tokenizer, config, vocab, kind)
    record = {
        "kind": kind,
        **model_cfg,
        "tokenizer_sha256": tok.sha256,
        "converted_from": {
            "source": str(source),
            "folder": str(folder),
            "weights": weight_file,
            "dtype": "/".join(dtypes),
            "official_config": config,
        },
    }
    weights = {k: v.contiguous() for k, v in weights.items()}
    path = save_checkpoint(out, model=None, config=record, tokenizer_json=tok.to_str(), weights=weights)
    return Conversion(path=path, kind=kind, num_tensors=len(weights), dtype="/".join(dtypes), notes=notes)
