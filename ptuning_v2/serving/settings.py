"""Settings shared by every serving entry point (terminal chat, web demo, API server)."""

from __future__ import annotations

import re
from pathlib import Path

DEFAULT_MODEL = "models/glm-zh-tiny"
# The main job's prefix: scripts/train_pt2.sh's OUTPUT_DIR with its defaults
# (output/<data dir>-<METHOD>-<PRE_SEQ_LEN>-<LR> for data/ner/train.json, ptuning_v2, 64, 1e-1).
DEFAULT_PREFIX_NAME = "ner"
DEFAULT_PREFIX_DIR = "output/ner-ptuning_v2-64-1e-1"
REPO_ROOT = Path(__file__).resolve().parents[2]

# Names travel in the OpenAI `model` field and in URLs: keep them to characters that need no quoting.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]*")


def parse_prefixes(spec: str | None) -> dict[str, str]:
    """``"ner=output/a,sent=output/b"`` -> ``{"ner": "output/a", "sent": "output/b"}``; empty -> ``{}``.

    Every entry needs a name and a path; names are unique. Paths are not opened here (loading checks them).
    """
    prefixes: dict[str, str] = {}
    if spec is None or not spec.strip():
        return prefixes
    for entry in spec.split(","):
        entry = entry.strip()
        if not entry:
            raise ValueError(f"PREFIXES={spec!r} has an empty entry; write NAME=PATH[,NAME=PATH...]")
        name, sep, path = entry.partition("=")
        name, path = name.strip(), path.strip()
        if not sep or not name:
            raise ValueError(
                f"PREFIXES entry {entry!r} has no name; write NAME=PATH, e.g. ner={entry.lstrip('=') or 'output/ner'}"
            )
        if not _NAME.fullmatch(name):
            raise ValueError(
                f"PREFIXES name {name!r} must start with a letter or digit and hold only letters, digits, "
                "'.', '_', ':' or '-'"
            )
        if not path:
            raise ValueError(f"PREFIXES entry {entry!r} has no path; write {name}=PATH")
        if name in prefixes:
            raise ValueError(
                f"PREFIXES names {name!r} twice ({prefixes[name]!r} and {path!r}); names are unique"
            )
        prefixes[name] = path
    return prefixes


def served_prefixes(spec: str | None, model: str) -> dict[str, str]:
    """The prefixes a server loads: ``spec`` (PREFIXES) as given; unset, the main job's prefix when ``model`` is
    the embedded one (the main job trains on it; its prefix would not fit another backbone)."""
    if spec is not None:
        return parse_prefixes(spec)
    return default_prefixes() if model == DEFAULT_MODEL else {}


def default_prefixes(root: str | Path = REPO_ROOT) -> dict[str, str]:
    """The main job's prefix (``ner``) when ``bash scripts/train_pt2.sh`` has saved it, else nothing."""
    path = Path(root) / DEFAULT_PREFIX_DIR
    if (path / "prefix_config.json").is_file():
        return {DEFAULT_PREFIX_NAME: str(path)}
    return {}
