"""Retention: how much of the backbone's general ability a method keeps, scored beside every task score.

After P-Tuning, users of THUDM's ChatGLM report that the model "lost its general chat ability" (catastrophic
forgetting). The retention score measures it without a judge, on a fixed general set, for the model with its
method on and for the bare backbone (``model.tuning.bare()``):

- **held-out perplexity**: the first ``--retention_heldout_lines`` texts of ``data/pretrain/heldout.txt`` (dev texts,
  never in pretraining) as plain documents, every token after the tokenizer's own start tokens scored (``</s>``
  included), as ``scripts/pretrain_tiny.py`` measures the embedded backbone;
- **copy probe**: ``复述这句话：<sentence>`` for the first ``--retention_copy_sentences`` sentences of
  ``data/seg/dev.json``, cut to ``--retention_copy_chars`` characters, greedy: exact copies (%) and the mean share
  of a sentence repeated before the first wrong character (%);
- **word listing**: ``列出这句话里的动词：<sentence>`` for the first ``--retention_listing_sentences`` POS-tagged dev
  sentences (``data/pretrain/dev_tagged.json``), greedy: micro F1 (%) of the (class, word) pairs listed;
- **a user's file** (``--retention_file``), for a real backbone: JSON lines of ``{"prompt", "response"}`` scored by
  the mean loss of the responses (tokenized as training does), or a plain ``.txt`` scored by perplexity.

The probes are the embedded backbone's own pretraining chats (``ptuning_v2.tasks``); a count of 0 leaves a probe
out. Torch and the data path are imported where they are used, so ``python -m ptuning_v2.retention`` (the bundled
files a run reads, for the shell to prepare) starts quickly.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .tasks import COPY_INSTRUCTION, listing_answer, listing_prompt, parse_listing, read_tagged

if TYPE_CHECKING:
    from torch import nn
    from transformers import PreTrainedTokenizerBase

# The word class the listing probe asks for: the probe, and a class every dev sentence is likely to have.
LISTING_PROBE_CLASSES = ["动词"]
# How many tokens an answer may run past its reference before generation stops: room for a near miss.
_ANSWER_SLACK = 8


@dataclass
class RetentionSettings:
    """The retention flags of ``ptuning_v2.train`` and ``ptuning_v2.evaluate`` (``RETENTION=``,
    ``RETENTION_FILE=`` in the scripts). The defaults are the fixed general set of the embedded backbone."""

    retention: bool = field(
        default=False,
        metadata={"help": "also score general ability, with the method and bare (see ptuning_v2.retention)"},
    )
    retention_file: str | None = field(
        default=None,
        metadata={
            "help": 'a general file of your own, scored too: JSON lines {"prompt", "response"} (response loss) '
            "or a plain .txt (perplexity)"
        },
    )
    retention_heldout_file: str = "data/pretrain/heldout.txt"
    retention_heldout_lines: int = field(default=200, metadata={"help": "held-out texts scored (0: none)"})
    retention_copy_file: str = "data/seg/dev.json"
    retention_copy_sentences: int = field(default=100, metadata={"help": "copy-probe sentences (0: none)"})
    retention_copy_chars: int = field(
        default=60, metadata={"help": "copy-probe sentences cut to this length"}
    )
    retention_listing_file: str = "data/pretrain/dev_tagged.json"
    retention_listing_sentences: int = field(
        default=50, metadata={"help": "word-listing sentences (0: none)"}
    )

    def parts(self) -> list[tuple[str, str, int]]:
        """``(flag, file, count)`` of each bundled probe that is on."""
        return [
            (flag, file, count)
            for flag, file, count in (
                ("retention_heldout_file", self.retention_heldout_file, self.retention_heldout_lines),
                ("retention_copy_file", self.retention_copy_file, self.retention_copy_sentences),
                ("retention_listing_file", self.retention_listing_file, self.retention_listing_sentences),
            )
            if count
        ]


BUNDLED_FILES: tuple[str, ...] = tuple(file for _, file, _ in RetentionSettings().parts())


def settings_problems(settings: RetentionSettings) -> list[str]:
    """What is wrong with the retention settings, each as ``--flag value: what is wrong`` (checked whether or not
    ``--retention`` is on, as every other setting is)."""
    problems = []
    for flag in ("retention_heldout_lines", "retention_copy_sentences", "retention_listing_sentences"):
        value = getattr(settings, flag)
        if not isinstance(value, int) or value < 0:
            problems.append(f"--{flag} {value}: must be 0 (left out) or a positive number")
    if not isinstance(settings.retention_copy_chars, int) or settings.retention_copy_chars < 1:
        problems.append(f"--retention_copy_chars {settings.retention_copy_chars}: must be a positive number")
    if not settings.retention:
        return problems
    files = [(flag, file) for flag, file, _ in settings.parts()]
    if settings.retention_file:
        files.append(("retention_file", settings.retention_file))
    for flag, file in files:
        if Path(file).is_dir():
            problems.append(f"--{flag} {file!r} is a directory, not a file")
        elif not Path(file).is_file():
            made = " (python data/prepare.py writes it)" if file in BUNDLED_FILES else ""
            problems.append(f"--{flag} {file!r} does not exist{made}")
    return problems


# ---------------------------------------------------------------- reading the general set


def read_copy_sentences(path: str | os.PathLike, count: int, max_chars: int) -> list[str]:
    """The first ``count`` unsegmented sentences of a ``seg`` split (its ``summary`` is the sentence with spaces
    between words), each cut to ``max_chars`` characters."""
    from .data import decode_utf8, iter_json_lines

    path = str(path)
    sentences = []
    for location, row in iter_json_lines(path, decode_utf8(path, Path(path).read_bytes())):
        if len(sentences) == count:
            break
        if not isinstance(row, dict) or not isinstance(row.get("summary"), str):
            raise ValueError(f"{location}: no 'summary' string (a segmentation row: words joined by spaces)")
        sentences.append(row["summary"].replace(" ", "")[:max_chars])
    return sentences


def read_texts(path: str | os.PathLike, count: int | None = None) -> list[str]:
    """The first ``count`` non-blank lines of a plain text file (all of them for None); not UTF-8 is named by
    line and column."""
    from .data import decode_utf8

    text = decode_utf8(str(path), Path(path).read_bytes())
    lines = [line for line in text.split("\n") if line.strip()]
    if not lines:
        raise ValueError(f"{path}: no text (the file is empty or holds only blank lines)")
    return lines[:count] if count is not None else lines


def read_pairs(path: str | os.PathLike) -> list[tuple[str, str]]:
    """A user's general file of ``{"prompt": ..., "response": ...}`` JSON lines; each problem names file and line."""
    from .data import decode_utf8, iter_json_lines

    path = str(path)
    pairs = []
    for location, row in iter_json_lines(path, decode_utf8(path, Path(path).read_bytes())):
        if not isinstance(row, dict):
            raise ValueError(f'{location}: expected a JSON object {{"prompt": ..., "response": ...}}')
        for key in ("prompt", "response"):
            if not isinstance(row.get(key), str):
                found = "missing" if key not in row else f"a {type(row[key]).__name__}"
                raise ValueError(
                    f"{location}: {key!r} is {found}; a retention file holds one "
                    '{"prompt": "...", "response": "..."} object a line (or is a plain .txt, scored by perplexity)'
                )
        if not row["response"].strip():
            raise ValueError(f"{location}: the response is empty: nothing to score")
        pairs.append((row["prompt"], row["response"]))
    if not pairs:
        raise ValueError(f"{path}: no prompt/response pairs (the file is empty)")
    return pairs


# ---------------------------------------------------------------- scoring


def text_example(tokenizer: PreTrainedTokenizerBase, text: str) -> tuple[list[int], list[int]]:
    """A plain document, ``(input_ids, labels)``: the tokenizer's own start tokens (ChatGLM's ``[gMASK] sop``) then
    the text and eos; every token after the start tokens is scored (the first token always has no context)."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    if tokenizer.eos_token_id is not None:
        ids = [*ids, tokenizer.eos_token_id]
    start = max(1, len(tokenizer("", add_special_tokens=True)["input_ids"]))
    return ids, [-100] * start + ids[start:]


def summed_nll(
    model: nn.Module, examples: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int = 32
) -> tuple[float, int]:
    """Summed negative log-likelihood of the labelled tokens (labels -100 are not scored) and their count."""
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    device = model.get_input_embeddings().weight.device
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            chunk = examples[i : i + batch_size]
            width = max(len(ids) for ids, _ in chunk)
            ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
            labels = torch.full_like(ids, -100)
            mask = torch.zeros_like(ids)
            for row, (tokens, targets) in enumerate(chunk):
                ids[row, : len(tokens)] = torch.tensor(tokens)
                labels[row, : len(targets)] = torch.tensor(targets)
                mask[row, : len(tokens)] = 1
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            # Input-prompt methods (P-Tuning v1, Prompt Tuning) put virtual tokens in front: the real tokens'
            # logits are the last ``width``.
            logits = logits[:, -width:][:, :-1].float()
            targets = labels[:, 1:].to(device)
            total += F.cross_entropy(
                logits.transpose(1, 2), targets, ignore_index=-100, reduction="sum"
            ).item()
            count += int((targets != -100).sum())
    model.train(was_training)
    return total, count


def copied_share(sentence: str, answer: str) -> float:
    """Share of ``sentence`` that ``answer`` repeats before its first wrong character."""
    n = 0
    while n < min(len(sentence), len(answer)) and sentence[n] == answer[n]:
        n += 1
    return n / len(sentence) if sentence else 1.0


def copy_scores(sentences: list[str], answers: list[str]) -> dict[str, float]:
    """Exact copies and the mean copied share, both in %."""
    return {
        "copy-exact": round(100 * sum(a == s for a, s in zip(answers, sentences)) / len(sentences), 4),
        "copy-share": round(100 * sum(map(copied_share, sentences, answers)) / len(sentences), 4),
    }


def listing_f1(references: list[str], answers: list[str]) -> float:
    """Micro F1 (%) over the ``(class, word)`` pairs of the listing answers (100 when neither lists anything)."""
    correct = predicted = gold = 0
    for reference, answer in zip(references, answers):
        wanted, given = parse_listing(reference), parse_listing(answer)
        correct, predicted, gold = correct + len(wanted & given), predicted + len(given), gold + len(wanted)
    if not predicted and not gold:
        return 100.0
    precision, recall = correct / predicted if predicted else 0.0, correct / gold if gold else 0.0
    return round(100 * 2 * precision * recall / (precision + recall), 4) if precision + recall else 0.0


@dataclass
class _Probe:
    key: str
    prompts: list[list[int]]
    references: list[str]
    shown: list[str]  # the prompt as text, for the answers file
    max_new_tokens: int


class RetentionSet:
    """The general set, read and tokenized once; ``score(model)`` scores any model over the same tokenizer (with
    its method on, or inside ``model.tuning.bare()``). ``max_source_length``/``max_target_length`` cut the pairs of
    a user's file as training would.

    Raises ``ValueError`` naming file and line for a bad file (``OSError`` for an unreadable one)."""

    def __init__(
        self,
        settings: RetentionSettings,
        tokenizer: PreTrainedTokenizerBase,
        batch_size: int = 32,
        max_source_length: int = 1024,
        max_target_length: int = 1024,
    ) -> None:
        from .data import generation_prompt_ids

        self.tokenizer, self.batch_size = tokenizer, batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.labels: dict[str, str] = {}
        self.texts: list[tuple[list[int], list[int]]] = []
        self.probes: list[_Probe] = []
        self.file_examples: list[tuple[list[int], list[int]]] = []
        self.file_kind = ""

        def prompt(text: str) -> list[int]:
            # The probes are a fixed set: their prompts are never cut to a run's --max_source_length.
            return generation_prompt_ids([{"role": "user", "content": text}], tokenizer)

        def probe(key: str, questions: list[str], references: list[str]) -> _Probe:
            longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references)
            return _Probe(key, [prompt(q) for q in questions], references, questions, longest + _ANSWER_SLACK)

        if settings.retention_heldout_lines:
            lines = read_texts(settings.retention_heldout_file, settings.retention_heldout_lines)
            self.texts = [text_example(tokenizer, line) for line in lines]
            self.labels["heldout-perplexity"] = f"held-out perplexity ({len(lines)} texts; lower is better)"
        if settings.retention_copy_sentences:
            sentences = read_copy_sentences(
                settings.retention_copy_file, settings.retention_copy_sentences, settings.retention_copy_chars
            )
            if not sentences:
                raise ValueError(f"{settings.retention_copy_file}: no sentences to copy")
            self.probes.append(probe("copy", [COPY_INSTRUCTION + s for s in sentences], sentences))
            shown = f"{len(sentences)} sentences of at most {settings.retention_copy_chars} characters"
            self.labels["copy-exact"] = f"exact copies, % ({shown})"
            self.labels["copy-share"] = "mean share copied before the first error, %"
        if settings.retention_listing_sentences:
            rows = read_tagged(settings.retention_listing_file)[: settings.retention_listing_sentences]
            if not rows:
                raise ValueError(f"{settings.retention_listing_file}: no tagged sentences")
            classes = LISTING_PROBE_CLASSES
            self.probes.append(
                probe(
                    "listing",
                    [listing_prompt(words, classes) for words, _ in rows],
                    [listing_answer(words, tags, classes) for words, tags in rows],
                )
            )
            self.labels["listing-f1"] = f"{'、'.join(classes)} listing F1 ({len(rows)} sentences)"
        if settings.retention_file:
            self._read_file(settings.retention_file, tokenizer, max_source_length, max_target_length)

    def _read_file(
        self, path: str, tokenizer: PreTrainedTokenizerBase, max_source_length: int, max_target_length: int
    ) -> None:
        name = Path(path).name
        if path.endswith(".txt"):
            lines = read_texts(path)
            self.file_examples = [text_example(tokenizer, line) for line in lines]
            self.file_kind = "file-perplexity"
            self.labels[self.file_kind] = f"perplexity on {name} ({len(lines)} texts; lower is better)"
            return
        import datasets

        from .data import DataConfig, tokenize_for_training

        pairs = read_pairs(path)
        rows = [
            {"messages": [{"role": "user", "content": p}, {"role": "assistant", "content": r}]}
            for p, r in pairs
        ]
        config = DataConfig(max_source_length=max_source_length, max_target_length=max_target_length)
        tokenized, _ = tokenize_for_training(datasets.Dataset.from_list(rows), tokenizer, config)
        self.file_examples = list(zip(tokenized["input_ids"], tokenized["labels"]))
        self.file_kind = "file-loss"
        self.labels[self.file_kind] = f"response loss on {name} ({len(pairs)} pairs; lower is better)"

    def score(self, model: nn.Module) -> tuple[dict[str, Any], list[dict[str, str]]]:
        """The retention metrics (keys as in ``labels``, plus ``seconds``), and every probe's answers."""
        from .generation import GenerationSettings, generate_texts

        start = time.perf_counter()
        metrics: dict[str, Any] = {}
        if self.texts:
            nll, count = summed_nll(model, self.texts, self.pad_id, self.batch_size)
            metrics["heldout-perplexity"] = round(math.exp(nll / count), 4)
        answers_of: list[dict[str, str]] = []
        for probe in self.probes:
            settings = GenerationSettings(max_new_tokens=probe.max_new_tokens)
            answers, _ = generate_texts(
                model, self.tokenizer, probe.prompts, settings, progress=False, batch_size=self.batch_size
            )
            if probe.key == "copy":
                metrics.update(copy_scores(probe.references, answers))
            else:
                metrics["listing-f1"] = listing_f1(probe.references, answers)
            answers_of += [
                {"probe": probe.key, "prompt": q, "reference": r, "answer": a}
                for q, r, a in zip(probe.shown, probe.references, answers)
            ]
        if self.file_examples:
            nll, count = summed_nll(model, self.file_examples, self.pad_id, self.batch_size)
            mean = nll / max(count, 1)
            metrics[self.file_kind] = round(
                math.exp(mean) if self.file_kind == "file-perplexity" else mean, 4
            )
        metrics["seconds"] = round(time.perf_counter() - start, 2)
        return metrics, answers_of


def write_answers(path: Path, answers: list[dict[str, str]]) -> Path:
    """The probes' answers as JSON lines, written atomically (``retention_answers.jsonl``)."""
    from .files import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(a, ensure_ascii=False) + "\n" for a in answers))
    return path


ANSWERS_FILE = "retention_answers.jsonl"


if __name__ == "__main__":
    # The bundled files of the general set, one a line: what scripts/train_pt2.sh and evaluate.sh prepare.
    print("\n".join(BUNDLED_FILES))
