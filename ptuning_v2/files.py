"""Writing files and directories so that a reader, or a crash, never meets half of them; reading JSON objects.

Every writer of this project goes through these:

- :func:`atomic_directory` builds a set of files in a fresh temporary directory beside the target and, once the
  ``with`` block ends without error, either swaps the whole directory in (``replace=True``: a converted model, a
  pretrained backbone) or moves the files into the target one by one in a chosen order (``replace=False``: a
  prefix checkpoint written into a Trainer's ``checkpoint-N``, its config last so that a reader that finds the
  config finds matching weights). An error inside the block removes the temporary directory, and any parent
  directory it had to create, and leaves the target untouched.
- :func:`swap_directory` puts a complete directory that already exists (a Trainer's staging folder) at the target
  in one rename, removing the old one only once the new one is in place.
- :func:`atomic_write_text`, :func:`atomic_write_bytes` and :func:`atomic_open` write one file through a temporary
  sibling and ``os.replace``.

Temporary names are hidden and carry ``.tmp-`` (``.old-`` for a directory being swapped out), so a leftover from
a killed process is recognisable (:func:`intended_path` names what it stood for), and no two writers share one.
Directories and files are created with the process's umask like any ``mkdir``/``open``, not owner-only as
``tempfile.mkdtemp``/``mkstemp`` would make them.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = [
    "atomic_directory",
    "atomic_open",
    "atomic_write_bytes",
    "atomic_write_text",
    "intended_path",
    "json_type",
    "read_json_object",
    "swap_directory",
]


def _fresh_name(parent: Path, stem: str, kind: str) -> Path:
    """A hidden, not yet existing path ``parent/.{stem}.{kind}-{random}``."""
    while True:
        path = parent / f".{stem}.{kind}-{secrets.token_hex(4)}"
        if not os.path.lexists(path):
            return path


_TEMPORARY = re.compile(r"\.(?P<stem>.+)\.(?:tmp|old)-[0-9a-f]{8}")


def intended_path(path: str | os.PathLike) -> Path:
    """The path that a temporary name of this module stands for, in every component: a failed write reports
    ``out/.checkpoint-4.tmp-1a2b3c4d/.x.json.tmp-5e6f7a8b`` as ``out/checkpoint-4/x.json``."""
    parts = [match.group("stem") if (match := _TEMPORARY.fullmatch(p)) else p for p in Path(path).parts]
    return Path(*parts)


def _fresh_dir(parent: Path, stem: str) -> Path:
    while True:
        path = _fresh_name(parent, stem, "tmp")
        try:
            path.mkdir()  # mode 0o777 & ~umask, unlike mkdtemp's 0o700
        except FileExistsError:
            continue
        return path


def _make_parents(directory: Path) -> list[Path]:
    """``mkdir -p directory``; returns the directories it created, deepest first."""
    missing = []
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return missing


def _remove_if_empty(directories: list[Path]) -> None:
    """Remove the directories (deepest first) that are still empty; stop at the first that is not."""
    for directory in directories:
        try:
            directory.rmdir()
        except OSError:
            break


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        try:
            path.unlink()
        except FileNotFoundError:
            pass


def _name_the_target(err: BaseException, target: Path) -> None:
    """A failed ``write()`` raises an OSError that names no file (``[Errno 28] No space left on device``): name
    the file or directory being written, so that whoever reports the error can say which."""
    if isinstance(err, OSError) and err.errno is not None and err.strerror and err.filename is None:
        err.filename = str(target)


def swap_directory(new: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Put the complete directory ``new`` at ``target`` (same file system), replacing whatever is there.

    At every moment ``target`` is the old tree, briefly absent, or the new one: the old tree is renamed aside to a
    hidden ``.{name}.old-*`` sibling, ``new`` is renamed to ``target``, and only then is the old tree removed. If
    the second rename fails, the old tree is put back. Returns ``target``.
    """
    new, target = Path(new), Path(target)
    if not os.path.lexists(target):
        os.replace(new, target)
        return target
    old = _fresh_name(target.parent, target.name, "old")
    os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        os.replace(old, target)
        raise
    _remove(old)
    return target


def _move_entries(tmp: Path, target: Path, last: Sequence[str]) -> None:
    """Move every entry of ``tmp`` into ``target``: those not in ``last`` by name, then ``last`` in its order."""
    target.mkdir(exist_ok=True)
    names = os.listdir(tmp)
    order = sorted(n for n in names if n not in last) + [n for n in last if n in names]
    for name in order:
        source, destination = tmp / name, target / name
        if source.is_dir() and destination.is_dir() and not destination.is_symlink():
            swap_directory(source, destination)  # a rename cannot replace a non-empty directory
        else:
            os.replace(source, destination)


@contextmanager
def atomic_directory(target: str | os.PathLike, *, replace: bool, last: Sequence[str] = ()) -> Iterator[Path]:
    """Yield a fresh, empty temporary directory beside ``target``; on success put its contents at ``target``.

    - ``replace=True``: the temporary directory becomes ``target`` in one rename (:func:`swap_directory`);
      anything ``target`` held before is gone, removed only after the new tree is in place.
    - ``replace=False``: ``target`` (created if missing) keeps its other files; each entry of the temporary
      directory is renamed into it, in name order except that the names in ``last`` come last, in the order
      given. Each file appears whole, but the set is complete only after the last rename: put the file that
      makes a reader trust the others (a config naming the weights) in ``last``.

    If the ``with`` block raises (``KeyboardInterrupt`` too), the temporary directory is removed, and so are the
    parent directories of ``target`` that this call created, and ``target`` is untouched (an OSError that names
    no file, as a failed ``write()`` raises, is given ``target``'s name). The temporary directory is a hidden
    ``.{name}.tmp-*`` sibling of ``target``, so the final renames stay on one file system.
    """
    target = Path(target)
    created = _make_parents(target.parent)
    tmp = _fresh_dir(target.parent, target.name)
    try:
        yield tmp
        if replace:
            swap_directory(tmp, target)
        else:
            _move_entries(tmp, target, tuple(last))
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_if_empty(created)
        _name_the_target(err, target)
        raise
    shutil.rmtree(tmp, ignore_errors=True)  # already gone (replace) or empty (moved)


@contextmanager
def atomic_open(
    path: str | os.PathLike, mode: str = "w", encoding: str | None = "utf-8", newline: str | None = None
) -> Iterator[IO[Any]]:
    """``open(path, mode)`` for writing, but into a hidden ``.{name}.tmp-*`` sibling renamed to ``path`` on success.

    ``mode`` is ``"w"`` or ``"wb"`` (``encoding`` and ``newline`` apply to text). On an error inside the block
    the temporary file is removed and ``path`` is untouched (an OSError that names no file is given ``path``'s
    name). Parent directories are created as needed.
    """
    if mode not in ("w", "wb"):
        raise ValueError(f"atomic_open writes a whole file: mode must be 'w' or 'wb', got {mode!r}")
    path = Path(path)
    created = _make_parents(path.parent)
    binary = mode == "wb"
    while True:
        tmp = _fresh_name(path.parent, path.name, "tmp")
        try:
            f = open(  # noqa: SIM115 - closed below, before the rename
                tmp,
                "xb" if binary else "x",
                encoding=None if binary else encoding,
                newline=None if binary else newline,
            )
        except FileExistsError:
            continue
        break
    try:
        with f:
            yield f
        os.replace(tmp, path)
    except BaseException as err:
        _remove(tmp)
        _remove_if_empty(created)
        _name_the_target(err, path)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (a temporary sibling, then ``os.replace``); returns ``path``."""
    with atomic_open(path, "wb") as f:
        f.write(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` atomically (a temporary sibling, then ``os.replace``); returns ``path``."""
    with atomic_open(path, "w", encoding=encoding) as f:
        f.write(text)
    return Path(path)


# ---------------------------------------------------------------- reading


def json_type(value: Any) -> str:
    """The JSON name of a parsed value's type (``object``, ``array``, ``string``, ``boolean``...), for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    names = {dict: "object", list: "array", str: "string", int: "integer", float: "number"}
    return names.get(type(value), type(value).__name__)


def read_json_object(path: str | os.PathLike, error: type[Exception] = ValueError) -> dict[str, Any]:
    """A JSON object from ``path``; every problem (encoding, syntax, not an object) is an ``error`` naming the file."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text (byte {err.start}); is this really a JSON file?") from err
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise error(
            f"{path}:{err.lineno}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
        ) from err
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, got {json_type(value)}")
    return value
