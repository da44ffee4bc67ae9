"""Evaluation text where training text must not have it: the one check, shared by data preparation (no dev/test
text of any task in a training split or the pretraining text, ``data/prepare.py``) and data mixing (no dev/test
text of the task in a mix file, ``ptuning_v2.mixing``). Torch-free, so the data preparation stays quick to start."""

from __future__ import annotations

import os
from collections.abc import Iterable

# Shorter remainders are not looked for: two-character words occur everywhere, and would flag innocent text.
MIN_TEXT_CHARS = 6


class LeakGuard:
    """Finds texts that contain an evaluation text verbatim (substring), in linear time per text."""

    def __init__(self, held_out: Iterable[str], key_len: int = 6) -> None:
        self.key_len = key_len
        self.index: dict[str, list[str]] = {}
        for text in set(held_out):
            if len(text) >= key_len:
                self.index.setdefault(text[:key_len], []).append(text)
            else:  # too short to index; exact matches are still caught
                self.index.setdefault(text, []).append(text)

    def found_in(self, text: str) -> str | None:
        """The first evaluation text that ``text`` contains, or None."""
        if text in self.index:
            return text
        k = self.key_len
        for i in range(len(text) - k + 1):
            for candidate in self.index.get(text[i : i + k], ()):
                if text.startswith(candidate, i):
                    return candidate
        return None

    def leaks(self, text: str) -> bool:
        return self.found_in(text) is not None


def prompt_texts(prompts: list[str]) -> list[str]:
    """What the prompts of a task's file say beyond its instruction: each prompt without the prefix they all share
    (``找出句中的人名、地名和机构名：`` in the bundled NER files), so that the sentence itself is looked for, wherever
    another file puts it. Remainders shorter than ``MIN_TEXT_CHARS`` are left out."""
    shared = os.path.commonprefix(prompts) if len(prompts) > 1 else ""
    return [text for p in prompts if len(text := p[len(shared) :].strip()) >= MIN_TEXT_CHARS]
