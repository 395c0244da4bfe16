"""Every file the project writes or reads back: atomic writes, atomic directories, strict JSON, JSON lines.

Three guarantees, each implemented once here:

- **A file is whole or absent.** ``atomic_write_text`` / ``atomic_write_bytes`` / ``atomic_file`` write a
  temporary file next to the target, flush and fsync it, rename it over the target (``os.replace``, atomic
  on POSIX and Windows) and fsync the directory, so a crash or a full disk never leaves a half-written
  file under the real name. A failed write removes its temporary file and says which file it was.
- **A directory is whole or absent.** ``atomic_directory`` builds a directory (a checkpoint, a prepared
  data folder) under a temporary name and swaps it in with ``replace_directory``: the old one is moved
  aside, the new one renamed in, the old one deleted. A crash at any point leaves the old or the new
  complete directory plus hidden leftovers, which ``recover_directories`` removes or, where the new one
  never arrived, moves back. The leftovers' names say what they were::

      .NAME.tmp-XXXXXXXX   being written (a file or a directory); never complete, always removed
      .NAME.old-XXXXXXXX   the previous complete NAME, moved aside while the new one was renamed in
      .NAME.del-XXXXXXXX   being deleted; removed

- **JSON is strict.** Python's ``json`` writes ``NaN`` and ``Infinity`` by default, which are not JSON:
  ``jq``, JavaScript's ``JSON.parse`` and most strict parsers reject the whole document. Every writer goes
  through ``to_json``, which writes a non-finite float as ``null`` and then refuses (``allow_nan=False``)
  anything non-finite that slipped through. Where a value can be undefined (a standard error of
  BrierLM = 0, say), the producer also records why next to it; see ``BrierAccumulator.summary``.

Logs (``metrics.jsonl``) are appended one JSON object a line (``append_jsonl``) and read back by one
reader (``read_jsonl``), which skips a last line cut short by a crash with a warning and refuses a
damaged line anywhere else, naming ``file:line``.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import uuid
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

TMP_TAG, OLD_TAG, DEL_TAG = "tmp-", "old-", "del-"
"""How a hidden leftover ``.NAME.TAG*`` came about: being written, moved aside, being deleted."""


class JSONFileError(ValueError):
    """A JSON or JSON-lines file cannot be parsed; the message names the file (and the line) and the fix.

    ``problem`` is the message without the generic fix, for callers that know a better one (a corrupt
    checkpoint: pick another checkpoint).
    """

    def __init__(self, problem: str, fix: str) -> None:
        super().__init__(f"{problem}; {fix}")
        self.problem = problem


# ----------------------------------------------------------------------------------------------
# Durability


def fsync_dir(path: str | Path) -> None:
    """Flush a directory's entries (the names created or renamed in it) to disk.

    Without it, a rename can be lost in a power cut even after the file's data was flushed. A no-op
    where directories cannot be opened (Windows) or the file system does not support it.
    """
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDWR)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every file under ``root``, then every directory, deepest first (a rename publishes them)."""
    for dirpath, _, filenames in os.walk(root, topdown=False):
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                _fsync_file(path)
        fsync_dir(dirpath)


def _hidden_sibling(path: Path, tag: str, *, name: str | None = None, create: str | None = None) -> Path:
    """A fresh ``.NAME.TAGxxxxxxxx`` next to ``path``; ``create``: ``"file"`` or ``"dir"`` creates it.

    Created with the usual permissions (0o666 / 0o777 less the umask), unlike ``tempfile``'s 0o600, so
    the file that it becomes reads like any other file the user writes.
    """
    while True:
        candidate = path.with_name(f".{name or path.name}.{tag}{uuid.uuid4().hex[:8]}")
        try:
            if create == "file":
                os.close(os.open(candidate, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
            elif create == "dir":
                os.mkdir(candidate, 0o777)
            elif os.path.lexists(candidate):
                continue
            return candidate
        except FileExistsError:
            continue


# ----------------------------------------------------------------------------------------------
# Atomic files


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block succeeds, it becomes ``path``.

    For writers that need a file name (``numpy.memmap``, ``savefig``). The temporary file exists (empty)
    when the block starts; the block writes it under any API it likes. On success the file is fsynced,
    renamed over ``path`` and the directory fsynced; on any error it is removed and ``path`` is left as
    it was. Parent directories are created.

    Raises:
        OSError: the write failed (a full disk, say); the message names ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _hidden_sibling(path, TMP_TAG, create="file")
    try:
        yield tmp
        _fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno is not None and e.filename in (None, str(tmp)):
            raise OSError(e.errno, f"could not write {path}: {e.strerror}") from e
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (see ``atomic_file``): afterwards ``path`` holds all of
    ``data``, or, after an error or a crash, whatever it held before."""
    with atomic_file(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` as UTF-8, atomically (see ``atomic_write_bytes``); newlines are not translated."""
    atomic_write_bytes(path, text.encode("utf-8"))


# ----------------------------------------------------------------------------------------------
# Atomic directories


def remove_directory(path: str | Path) -> None:
    """Delete the directory ``path`` so that a crash never leaves a partial ``path``: it is first renamed
    to a hidden ``.NAME.del-*`` (atomic), then deleted.

    Raises:
        OSError: ``path`` could not be renamed (it is missing, say); nothing was deleted.
    """
    path = Path(path)
    _delete(path, path.name)


def _delete(path: Path, name: str) -> None:
    doomed = _hidden_sibling(path, DEL_TAG, name=name)
    os.replace(path, doomed)
    if doomed.is_dir() and not doomed.is_symlink():
        shutil.rmtree(doomed, ignore_errors=True)
    else:  # replace_directory over a file
        doomed.unlink(missing_ok=True)


def replace_directory(source: str | Path, target: str | Path) -> None:
    """Make the complete directory ``source`` the directory ``target``, replacing any existing one.

    Every file and directory under ``source`` is fsynced first. If ``target`` exists it is moved aside
    to ``.NAME.old-*``, ``source`` is renamed to ``target``, the parent directory is fsynced, and only
    then is the old one deleted (through ``remove_directory``). At every instant a complete ``target``
    exists or a complete ``.NAME.old-*`` waits to be moved back by ``recover_directories``. ``source``
    and ``target`` must be on the same file system (a sibling, as ``atomic_directory`` makes).
    """
    source, target = Path(source), Path(target)
    _fsync_tree(source)
    if not os.path.lexists(target):
        os.replace(source, target)
        fsync_dir(target.parent)
        return
    old = _hidden_sibling(target, OLD_TAG)
    os.replace(target, old)
    try:
        os.replace(source, target)
    except BaseException:
        os.replace(old, target)  # the new one did not arrive: put the old one back
        raise
    fsync_dir(target.parent)
    _delete(old, target.name)


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory ``.NAME.tmp-*`` next to ``target``; when the block succeeds, it
    replaces ``target`` (``replace_directory``). When the block raises, it is deleted and ``target`` is
    left as it was. Parent directories are created."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = _hidden_sibling(target, TMP_TAG, create="dir")
    try:
        yield tmp
        replace_directory(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def recover_directories(root: str | Path, is_complete: Callable[[Path], bool] | None = None) -> None:
    """Clear what interrupted writes, replacements and deletions left among ``root``'s entries.

    A ``.NAME.old-*`` directory is the previous ``NAME`` that ``replace_directory`` moved aside; if
    ``NAME`` is missing (the crash came between the two renames) it is moved back, provided
    ``is_complete(it)`` (default: always). Every other ``.NAME.tmp-*``, ``.NAME.old-*`` and
    ``.NAME.del-*`` entry, file or directory, is deleted. Other entries are not touched.
    """
    root = Path(root)
    if not root.is_dir():
        return
    for entry in sorted(root.iterdir()):
        if not entry.name.startswith("."):
            continue
        name, _, tag = entry.name[1:].rpartition(".")
        if not tag.startswith((TMP_TAG, OLD_TAG, DEL_TAG)):
            continue
        restorable = tag.startswith(OLD_TAG) and entry.is_dir() and name and not os.path.lexists(root / name)
        if restorable and (is_complete is None or is_complete(entry)):
            os.replace(entry, root / name)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------
# Strict JSON


def finite_or_none(obj: Any) -> Any:
    """``obj`` with every non-finite float (NaN, ±inf), at any depth, replaced by None.

    Dicts, lists and tuples are rebuilt (tuples become lists, as JSON has no tuples); numpy and
    torch scalars that are floats are handled through ``float()``. Other values pass unchanged.
    """
    if isinstance(obj, dict):
        return {key: finite_or_none(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_or_none(value) for value in obj]
    if isinstance(obj, float) or (hasattr(obj, "dtype") and getattr(obj, "ndim", None) == 0 and _is_float(obj)):
        value = float(obj)
        return value if math.isfinite(value) else None
    return obj


def _is_float(scalar: Any) -> bool:
    kind = getattr(scalar.dtype, "kind", None)  # numpy
    return kind == "f" if kind is not None else bool(getattr(scalar.dtype, "is_floating_point", False))


def to_json(obj: Any, **kwargs: Any) -> str:
    """``json.dumps`` that always yields strict JSON (non-finite floats become ``null``).

    Keyword arguments are those of ``json.dumps`` (``indent``, ``sort_keys``, ...).
    """
    return json.dumps(finite_or_none(obj), allow_nan=False, **kwargs)


def write_json(path: str | Path, obj: Any, *, indent: int | None = 2, sort_keys: bool = False) -> None:
    """Write ``obj`` to ``path`` as strict JSON (``to_json``) and a final newline, atomically."""
    atomic_write_text(path, to_json(obj, indent=indent, sort_keys=sort_keys) + "\n")


def read_json(path: str | Path) -> Any:
    """The JSON value in ``path`` (UTF-8).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        JSONFileError: it is not valid JSON; the message names the file and where parsing failed.
    """
    path = Path(path)
    raw = path.read_bytes()
    try:
        return json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        problem = f"{path} is not UTF-8 text (invalid byte at offset {e.start})"
    except json.JSONDecodeError as e:
        problem = f"{path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno})"
    raise JSONFileError(problem, "the file is damaged or was cut short: write it again or restore it")


# ----------------------------------------------------------------------------------------------
# JSON lines


def append_jsonl(path: str | Path, record: dict[str, Any]) -> None:
    """Append ``record`` to ``path`` as one line of strict JSON.

    Not atomic and not fsynced, for speed (a training run appends a line every few steps): a crash can
    leave the last line cut short, which ``read_jsonl`` skips with a warning.
    """
    with open(path, "a", encoding="utf-8") as f:
        f.write(to_json(record) + "\n")


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    """The records of a JSON-lines file (one JSON object a line; blank lines are ignored), in order.

    A last line that is not valid JSON is what a crash in the middle of ``append_jsonl`` (or a reader
    racing a writer) leaves: it is skipped, with a ``UserWarning`` that names the file.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        JSONFileError: a line before the last is not a JSON object; the message names ``file:line``.
    """
    path = Path(path)
    lines = path.read_bytes().decode("utf-8", errors="replace").split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            if i == last:
                warnings.warn(
                    f"{path}: skipped its last line ({i + 1}), which is cut short; a run stopped while writing it",
                    stacklevel=2,
                )
                break
            raise JSONFileError(
                f"{path}:{i + 1} is not valid JSON ({e.msg})",
                "the file was damaged or edited: repair or delete that line",
            ) from None
        if not isinstance(record, dict):
            raise JSONFileError(
                f"{path}:{i + 1} holds a JSON {type(record).__name__}, not an object",
                "each line must be one JSON object: repair or delete that line",
            )
        records.append(record)
    return records
