"""How every benchmark reports: a markdown table with the date and machine under it, printed and written,
with the raw numbers, to ``<out>.md`` and ``<out>.json``."""

from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch


def write_report(out: str | Path, table: list[str], settings: str, raw: dict) -> str:
    """Print and save ``table`` followed by ``<date>, <machine>, <settings>``; return the markdown text."""
    machine = f"{platform.machine()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}"
    text = "\n".join(table) + f"\n\n{time.strftime('%Y-%m-%d')}, {machine}, {settings}\n"
    print(text)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps(raw, indent=2) + "\n")
    return text
