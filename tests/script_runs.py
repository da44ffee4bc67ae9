"""Training through ``scripts/train_pt2.sh`` without paying a new process each time: the script checks the settings
and prints its command (``DRY_RUN=true``), and the command then runs in the test's process. A training subprocess on
a tiny model spends most of its ~10 s importing torch, transformers and peft."""

from __future__ import annotations

import contextlib
import io
import os
import shlex
import subprocess
from pathlib import Path

from ptuning_v2.train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}


def train_through_script(*settings: str) -> str:
    """What the script printed, then what the training printed (stdout)."""
    # The main job scores retention; a few items of each probe keep that path covered for every method and cheap.
    small = [
        "--retention_heldout_lines",
        "4",
        "--retention_copy_sentences",
        "4",
        "--retention_listing_sentences",
        "4",
    ]
    command = ["bash", str(ROOT / "scripts/train_pt2.sh"), "DRY_RUN=true", *settings, *small]
    result = subprocess.run(command, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("+ "))
    words = shlex.split(line[2:])
    assert words[:3] == ["python", "-m", "ptuning_v2.train"], line
    printed = io.StringIO()
    with contextlib.chdir(ROOT), contextlib.redirect_stdout(printed):
        train_main(words[3:])
    return result.stdout + printed.getvalue()
