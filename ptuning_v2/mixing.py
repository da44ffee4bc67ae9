"""Data mixing: general examples interleaved into training at a fixed share of every batch, the mitigation of
forgetting that THUDM's maintainers advise (ChatGLM-6B #730: "mix general data into the training set").

``--mix_file path[,path] --mix_ratio 0.2`` (``MIX_FILE=``, ``MIX_RATIO=``): each batch of
``--per_device_train_batch_size`` examples holds ``ratio`` of them from the mix files. Batch ``i`` takes
``floor((i+1)·B·r) - floor(i·B·r)`` mixed examples, so every full batch has ``floor(B·r)`` or ``ceil(B·r)`` of them
and the share over the run is ``r`` exactly. An epoch is one pass over the task's examples (each once, in a seeded
order); the mixed examples come in a seeded order too, each once before any repeats. The order is a function of the
seed and the epoch alone, so a resumed run, whose Trainer skips the batches it has trained, continues the same mix;
a checkpoint records the mix it was trained with (``mix.json``) and a resume with another mix is refused.

For the embedded backbone the bundled general chats (``data/general/chats.json``, ``data/prepare.py``: its own
pretraining chat kinds over pretraining texts, no dev/test text of any task) are the mix when ``--mix_ratio`` is
given alone. Refused, before anything is loaded: a ratio outside [0, 1), a mix file of another format than the
task's, and a mix file holding dev or test text of the task.

The sampler is a plain iterable with a length, which the DataLoader takes as it takes a Sampler; the data path is
imported where it is read, so the scripts can read ``BUNDLED_MIX`` without starting it.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .leaks import LeakGuard, prompt_texts

if TYPE_CHECKING:
    from .data import DataConfig

BUNDLED_MIX = "data/general/chats.json"
MIX_RECORD = "mix.json"  # in every checkpoint of a mixed run


def batch_shares(batch_size: int, ratio: float, task_examples: int) -> list[int]:
    """How many mixed examples each batch of one epoch takes, so that the task's examples are each used once:
    ``floor((i+1)·B·r) - floor(i·B·r)`` for batch ``i``; the last, partial batch in proportion to its task
    examples."""
    shares, used, i = [], 0, 0
    while used < task_examples:
        # Whole numbers of 1e-9 steps keep 16 * 0.2 = 3.2000000000000006 from adding an example.
        mixed = math.floor((i + 1) * batch_size * ratio + 1e-9) - math.floor(i * batch_size * ratio + 1e-9)
        task = batch_size - mixed
        if used + task > task_examples:  # the last batch: what is left of the task, and its share of mix
            task = task_examples - used
            mixed = round(task * ratio / (1 - ratio))
        shares.append(mixed)
        used, i = used + task, i + 1
    return shares


class MixSampler:
    """Indices into the task examples (``0..task_examples-1``) followed by the mixed ones, batch by batch as
    ``batch_shares`` says; ``set_epoch`` (called by the Trainer) reorders both for the next epoch."""

    def __init__(
        self, task_examples: int, mix_examples: int, batch_size: int, ratio: float, seed: int
    ) -> None:
        if not 0 < ratio < 1:
            raise ValueError(f"mix ratio {ratio} must be in (0, 1)")
        self.task_examples, self.mix_examples = task_examples, mix_examples
        self.batch_size, self.ratio, self.seed = batch_size, ratio, seed
        self.shares = batch_shares(batch_size, ratio, task_examples)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.task_examples + sum(self.shares)

    def batches(self) -> list[list[int]]:
        """This epoch's batches, each its task examples then its mixed ones."""
        rng = random.Random(f"{self.seed}:{self.epoch}")  # a string seed: the same stream on every platform
        task = list(range(self.task_examples))
        rng.shuffle(task)
        mixed: list[int] = []
        while len(mixed) < sum(self.shares):  # each mixed example once before any repeats
            cycle = list(range(self.task_examples, self.task_examples + self.mix_examples))
            rng.shuffle(cycle)
            mixed += cycle
        out, t, m = [], 0, 0
        for share in self.shares:
            size = min(self.batch_size - share, self.task_examples - t)
            out.append(task[t : t + size] + mixed[m : m + share])
            t, m = t + size, m + share
        return out

    def __iter__(self) -> Iterator[int]:
        for batch in self.batches():
            yield from batch


@dataclass
class MixPlan:
    """The mix of a run, once its files are tokenized: what the sampler needs, and what checkpoints record."""

    files: list[str]
    ratio: float
    task_examples: int
    mix_examples: int

    def sampler(self, batch_size: int, seed: int) -> MixSampler:
        return MixSampler(self.task_examples, self.mix_examples, batch_size, self.ratio, seed)

    def record(self) -> dict[str, Any]:
        return mix_record(self.files, self.ratio)


def mix_record(files: list[str], ratio: float) -> dict[str, Any]:
    """What identifies a mix: its ratio and the content of its files (a file moved elsewhere is the same mix)."""
    return {
        "ratio": ratio,
        "files": files,
        "sha256": [hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files],
    }


def write_record(plan: MixPlan, checkpoint: Path) -> None:
    from .files import atomic_write_text

    atomic_write_text(checkpoint / MIX_RECORD, json.dumps(plan.record(), indent=2) + "\n")


def resume_problem(checkpoint: str | Path, files: list[str], ratio: float) -> str | None:
    """Why a run with this mix cannot continue ``checkpoint``, or None: a resumed run must continue the mix it
    was trained with (a checkpoint without ``mix.json`` was trained without mixing)."""
    path = Path(checkpoint) / MIX_RECORD
    try:
        recorded = json.loads(path.read_text()) if path.is_file() else {"ratio": 0, "files": [], "sha256": []}
    except (OSError, ValueError):
        return f"--resume_from_checkpoint {checkpoint}: its {MIX_RECORD} cannot be read"
    wanted = mix_record(files, ratio) if ratio else {"ratio": 0, "files": [], "sha256": []}
    if (
        float(recorded.get("ratio", 0)) == float(wanted["ratio"])
        and recorded.get("sha256") == wanted["sha256"]
    ):
        return None

    def shown(record: dict[str, Any]) -> str:
        if not record.get("ratio"):
            return "no mixing"
        return f"--mix_ratio {record['ratio']:g} of {','.join(record.get('files') or [])}"

    same = "the same files, as they were" if recorded.get("ratio") else "no MIX_FILE/MIX_RATIO"
    return (
        f"--resume_from_checkpoint {checkpoint} was trained with {shown(recorded)}, this run has {shown(wanted)}: "
        f"a resumed run continues its mix; resume with {same}, or start a new run"
    )


def settings_problems(
    mix_files: list[str],
    ratio: float,
    train_files: list[str],
    held_out: list[tuple[str, str]],
    config: DataConfig,
    task_type: str,
) -> list[str]:
    """What rules the mix out, each as ``--flag value: what is wrong``; ``held_out`` is ``(flag, path)`` of the
    task's dev and test files. Reads the mix files and the held-out files (not the model)."""
    if not 0 <= ratio < 1:  # False for nan too
        return [
            f"--mix_ratio {ratio:g}: must be in [0, 1), the share of every batch taken from --mix_file "
            "(0: no mixing; 1 would leave no example of the task)"
        ]
    if not mix_files:
        if ratio:
            return [
                f"--mix_ratio {ratio:g} needs --mix_file (MIX_FILE=): the bundled general chats ({BUNDLED_MIX}) "
                "are the default mix only for the embedded backbone, whose own chat kinds they are"
            ]
        return []
    if not ratio:
        return [
            f"--mix_file {','.join(mix_files)} with --mix_ratio 0 mixes nothing: give --mix_ratio in (0, 1)"
        ]
    if task_type != "generation":
        return [
            f"--mix_file with --task_type {task_type}: data mixing interleaves chats into generative training; "
            "an NLU head's rows have no general counterpart"
        ]
    problems = []
    for path in mix_files:
        if Path(path).is_dir():
            problems.append(f"--mix_file {path!r} is a directory, not a data file")
        elif not Path(path).is_file():
            made = " (python data/prepare.py writes it)" if path == BUNDLED_MIX else ""
            problems.append(f"--mix_file {path!r} does not exist{made}")
    if problems:
        return problems
    task_format = next((f for f in map(_format_or_none, train_files) if f), None)
    for path in mix_files:
        found = _format_or_none(path)
        if task_format and found and found != task_format:
            problems.append(
                f"--mix_file {path}: its rows are in the {found!r} format, the task's --train_file in "
                f"{task_format!r}; a mix file must have the task's format"
                + (
                    f" (columns {config.prompt_column!r}/{config.response_column!r})"
                    if task_format == "columns"
                    else ""
                )
            )
    if problems:
        return problems
    from .data import read_conversations

    guard = _held_out_guard(held_out, config)
    mix_config = replace(config, source_prefix="")  # the task's instruction is not the general chats'
    for path in mix_files:
        try:
            rows = read_conversations(path, mix_config)
        except ValueError as err:
            problems.append(f"--mix_file {err}")
            continue
        for where, messages in rows[0]:
            leaked = guard and guard[0].found_in("".join(m["content"] for m in messages))
            if leaked:
                problems.append(
                    f"--mix_file {where} holds a text of {guard[1][leaked]} ({leaked[:40]!r}): training would see "
                    "the task's dev/test text; remove such rows from the mix file"
                )
                break
    return problems


def _format_or_none(path: str) -> str | None:
    from .data import conversation_format

    try:
        return conversation_format(path)
    except (OSError, ValueError):
        return None  # a file that cannot be read is named by its own check


def _held_out_guard(
    held_out: list[tuple[str, str]], config: DataConfig
) -> tuple[LeakGuard, dict[str, str]] | None:
    """A guard over the prompts' texts of the task's dev and test files, and which file each text is from."""
    from .data import read_conversations

    owner: dict[str, str] = {}
    for flag, path in held_out:
        try:
            rows, _ = read_conversations(path, config)
        except (OSError, ValueError):
            continue  # named by the file checks, or when the run loads it
        prompts = [m["content"] for _, messages in rows for m in messages if m["role"] == "user"]
        for text in prompt_texts(prompts):
            owner.setdefault(text, f"--{flag} {path}")
    return (LeakGuard(owner), owner) if owner else None
