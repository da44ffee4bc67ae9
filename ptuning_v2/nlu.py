"""NLU heads over a frozen backbone: the P-Tuning v2 paper's own setting (``--task_type seq_cls|token_cls``).

    seq_cls    one label per text, ``{"text": ..., "label": ...}``, through ``AutoModelForSequenceClassification``
               (scored by accuracy)
    token_cls  one BIO tag per character, ``{"tokens": [chars], "tags": ["B-PER", "I-PER", "O", ...]}``, through
               ``AutoModelForTokenClassification`` (scored by exact span + type match, micro P/R/F1)

The data path reads in one direction: read and check the file -> the label set (sorted, from the training file,
recorded as ``labels.json`` in the output directory and every checkpoint) -> tokenize -> collate (left padding)
-> loss / predict -> score. Any method trains the head with its own parameters; the backbone stays frozen.

Two things differ from a plain classification model, both because of the virtual-token methods (``ptuning_v1``,
``prompt_tuning``), which put P positions in front of the inputs:

- token classification gets ``P + L`` logits per row: the last ``L`` are the real tokens (``token_logits``);
- sequence classification pools the last position when the model sees ``inputs_embeds`` (it cannot find padding
  there), so padding must be on the left, where the last position is always the last real token.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification

from .data import IGNORE_INDEX, decode_utf8, iter_json_array, iter_json_lines
from .files import atomic_write_text

TASK_TYPES = ("generation", "seq_cls", "token_cls")
NLU_TASK_TYPES = ("seq_cls", "token_cls")
LABELS_FILE = "labels.json"
_FIELDS = {"seq_cls": ("text", "label"), "token_cls": ("tokens", "tags")}


# ---------------------------------------------------------------------------------------------- reading


def _check_row(obj: Any, task_type: str, location: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise ValueError(f"{location}: expected a JSON object (one row), got {type(obj).__name__}")
    for field in _FIELDS[task_type]:
        if field not in obj:
            raise ValueError(
                f"{location}: missing field {field!r} for --task_type {task_type} (needs "
                f"{' and '.join(map(repr, _FIELDS[task_type]))}); fields found: {list(obj)}"
            )
    if task_type == "seq_cls":
        if not isinstance(obj["text"], str) or not obj["text"].strip():
            raise ValueError(f"{location}: field 'text' must be a non-empty string")
        if not isinstance(obj["label"], (str, int)) or isinstance(obj["label"], bool):
            raise ValueError(
                f"{location}: field 'label' must be a string or an integer, got {obj['label']!r}"
            )
        return {"text": obj["text"], "label": obj["label"]}
    tokens, tags = obj["tokens"], obj["tags"]
    if not isinstance(tokens, list) or not tokens or not all(isinstance(t, str) and t for t in tokens):
        raise ValueError(f"{location}: field 'tokens' must be a non-empty list of non-empty strings")
    if not isinstance(tags, list) or not all(isinstance(t, str) for t in tags) or len(tags) != len(tokens):
        raise ValueError(
            f"{location}: field 'tags' must be a list of strings, one per token ({len(tokens)} tokens)"
        )
    return {"tokens": tokens, "tags": tags}


def read_rows(path: str, task_type: str) -> list[dict[str, Any]]:
    """Every row of a JSON-lines (or JSON list) file, checked; errors name ``file:line``."""
    text = decode_utf8(path, Path(path).read_bytes())
    parse = iter_json_array if text.lstrip().startswith("[") else iter_json_lines
    rows = [_check_row(obj, task_type, location) for location, obj in parse(path, text)]
    if not rows:
        raise ValueError(f"{path}: no examples (the file is empty or holds only blank lines)")
    return rows


def label_set(rows: list[dict[str, Any]], task_type: str, path: str) -> list[Any]:
    """The sorted labels (seq_cls) or tags (token_cls) of a training file."""
    found = {r["label"] for r in rows} if task_type == "seq_cls" else {t for r in rows for t in r["tags"]}
    if len({type(label) for label in found}) > 1:
        raise ValueError(f"{path}: labels mix strings and integers ({sorted(map(str, found))}); use one kind")
    return sorted(found)


# ---------------------------------------------------------------------------------------------- the label set on disk


def write_labels(directory: str | Path, task_type: str, labels: list[Any]) -> Path:
    """``labels.json``: what the head's output ids mean, so evaluation and prediction map ids back."""
    payload = {"task_type": task_type, "labels": labels}
    return atomic_write_text(Path(directory) / LABELS_FILE, json.dumps(payload, ensure_ascii=False) + "\n")


def read_labels(checkpoint: str | Path) -> tuple[str, list[Any]] | None:
    """``(task_type, labels)`` of a checkpoint: its own ``labels.json``, or its run's (a ``checkpoint-N``'s parent)."""
    for directory in (Path(checkpoint), Path(checkpoint).parent):
        file = directory / LABELS_FILE
        if file.is_file():
            payload = json.loads(file.read_text(encoding="utf-8"))
            return payload["task_type"], payload["labels"]
    return None


def model_kwargs(task_type: str, labels: list[Any], pad_token_id: int) -> dict[str, Any]:
    """What ``load_model`` needs for a classification backbone with ``len(labels)`` outputs."""
    model_class = (
        AutoModelForSequenceClassification if task_type == "seq_cls" else AutoModelForTokenClassification
    )
    return {
        "model_class": model_class,
        "num_labels": len(labels),
        "id2label": {i: str(label) for i, label in enumerate(labels)},
        "label2id": {str(label): i for i, label in enumerate(labels)},
        # The sequence head pools the last token that is not padding: it must know the tokenizer's pad.
        "pad_token_id": pad_token_id,
    }


# ---------------------------------------------------------------------------------------------- tokenizing


def _label_id(label: Any, ids: dict[Any, int], where: str) -> int:
    if label not in ids:
        raise ValueError(f"{where}: label {label!r} is not among the training file's labels {list(ids)}")
    return ids[label]


def _token_starts(tokens: list[str]) -> dict[int, int]:
    """Offset in the joined text -> index of the data token (character) starting there."""
    starts, position = {}, 0
    for index, token in enumerate(tokens):
        starts[position] = index
        position += len(token)
    return starts


def _cover(offsets: list[tuple[int, int]], tokens: list[str]) -> list[int]:
    """Per data token, the tokenizer token whose span holds its start (-1: none, e.g. cut by truncation).

    Where several tokens share a span (SentencePiece's dummy ``▁`` and the first character's piece, or the
    byte-fallback pieces of one character), the last one counts. Special tokens have empty spans."""
    starts, cover = _token_starts(tokens), [-1] * len(tokens)
    for index, (start, end) in enumerate(offsets):
        for position in range(start, end):
            if position in starts:
                cover[starts[position]] = index
    return cover


def tokenize_rows(
    rows: list[dict[str, Any]], tokenizer: Any, task_type: str, labels: list[Any], max_length: int, where: str
) -> list[dict[str, Any]]:
    """``input_ids`` and ``labels`` per row; token_cls keeps ``cover`` and the gold tags for scoring by character.

    A token is labelled with the tag of the first data token it covers; tokens that cover none (special tokens,
    a dummy ``▁``) are ignored by the loss."""
    ids = {label: i for i, label in enumerate(labels)}
    if task_type == "seq_cls":
        encoded = tokenizer([r["text"] for r in rows], truncation=True, max_length=max_length)
        return [
            {"input_ids": input_ids, "labels": _label_id(row["label"], ids, where)}
            for row, input_ids in zip(rows, encoded["input_ids"])
        ]
    texts = ["".join(r["tokens"]) for r in rows]
    encoded = tokenizer(texts, truncation=True, max_length=max_length, return_offsets_mapping=True)
    examples = []
    for row, input_ids, offsets in zip(rows, encoded["input_ids"], encoded["offset_mapping"]):
        cover = _cover(offsets, row["tokens"])
        token_labels = [IGNORE_INDEX] * len(input_ids)
        for char in reversed(range(len(cover))):  # reversed: the first data token a token covers wins
            if cover[char] >= 0:
                token_labels[cover[char]] = _label_id(row["tags"][char], ids, where)
        examples.append({"input_ids": input_ids, "labels": token_labels, "cover": cover, "gold": row["tags"]})
    return examples


def collator(pad_token_id: int) -> Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]]:
    """Left padding (the sequence head pools the last position; see the module doc); labels padded with -100."""

    def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(e["input_ids"]) for e in examples)
        pad = [width - len(e["input_ids"]) for e in examples]
        batch = {
            "input_ids": torch.tensor(
                [[pad_token_id] * p + list(e["input_ids"]) for e, p in zip(examples, pad)]
            ),
            "attention_mask": torch.tensor([[0] * p + [1] * (width - p) for p in pad]),
        }
        first = examples[0]["labels"]
        if isinstance(first, int):
            batch["labels"] = torch.tensor([e["labels"] for e in examples])
        else:
            batch["labels"] = torch.tensor(
                [[IGNORE_INDEX] * p + list(e["labels"]) for e, p in zip(examples, pad)]
            )
        return batch

    return collate


# ---------------------------------------------------------------------------------------------- loss and prediction


def token_logits(logits: torch.Tensor, length: int) -> torch.Tensor:
    """The logits of the real tokens: virtual-token methods put P more positions in front."""
    return logits[:, -length:] if logits.dim() == 3 else logits


def loss(outputs: Any, labels: torch.Tensor, num_items_in_batch: Any = None) -> torch.Tensor:
    """Cross-entropy of the head (the Trainer's ``compute_loss_func``), normalised over the accumulated batch."""
    logits = token_logits(outputs.logits, labels.shape[-1]).float()
    total = nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum"
    )
    count = num_items_in_batch if num_items_in_batch is not None else (labels != IGNORE_INDEX).sum()
    return total / torch.as_tensor(count, device=total.device).clamp(min=1)


@torch.no_grad()
def predict(
    model: nn.Module, examples: list[dict[str, Any]], pad_token_id: int, batch_size: int
) -> list[Any]:
    """Predicted label ids per example: an int (seq_cls) or one id per token of its ``input_ids`` (token_cls)."""
    was_training = model.training
    model.eval()
    collate, device = collator(pad_token_id), model.get_input_embeddings().weight.device
    found: list[Any] = []
    try:
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            batch = collate(chunk)
            width = batch["input_ids"].shape[1]
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            )
            chosen = token_logits(logits.logits, width).argmax(-1).tolist()
            for example, row in zip(chunk, chosen):  # token_cls: drop the left padding
                found.append(row[width - len(example["input_ids"]) :] if isinstance(row, list) else row)
    finally:
        model.train(was_training)
    return found


# ---------------------------------------------------------------------------------------------- scoring


def bio_spans(tags: Sequence[str]) -> set[tuple[str, int, int]]:
    """``(type, start, end)`` chunks of a BIO sequence, as seqeval's default mode reads them: a chunk starts at
    ``B-X``, or at ``I-X`` after anything but ``X``; it runs while ``I-X`` follows."""
    spans, kind, start = set(), None, 0
    for index, tag in enumerate([*tags, "O"]):
        prefix, _, label = tag.partition("-")
        continues = prefix == "I" and label == kind
        if kind is not None and not continues:
            spans.add((kind, start, index))
            kind = None
        if prefix in ("B", "I") and not continues:
            kind, start = label, index
    return spans


def span_scores(gold: list[list[str]], predicted: list[list[str]]) -> dict[str, float]:
    """Micro precision/recall/F1 (×100) over exact (type, start, end) matches, summed over sentences."""
    hits = found = wanted = 0
    for gold_tags, predicted_tags in zip(gold, predicted):
        g, p = bio_spans(gold_tags), bio_spans(predicted_tags)
        hits, found, wanted = hits + len(g & p), found + len(p), wanted + len(g)
    precision = 100 * hits / found if found else 0.0
    recall = 100 * hits / wanted if wanted else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"span-precision": round(precision, 4), "span-recall": round(recall, 4), "span-f1": round(f1, 4)}


def character_tags(example: dict[str, Any], token_ids: list[int], labels: list[Any]) -> list[str]:
    """One predicted tag per data token (character): its covering token's tag. A character inside a longer token
    continues that token's entity (``I-X``); one that no token covers (cut by truncation) is ``O``."""
    tags, cover = [], example["cover"]
    for char, token in enumerate(cover):
        tag = str(labels[token_ids[token]]) if token >= 0 else "O"
        inside = char > 0 and cover[char - 1] == token >= 0
        tags.append("I-" + tag.partition("-")[2] if inside and tag != "O" else tag)
    return tags


def score(
    examples: list[dict[str, Any]], predictions: list[Any], task_type: str, labels: list[Any]
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """The metrics (accuracy, or span P/R/F1; ×100) and one record per example for the predictions file."""
    if task_type == "seq_cls":
        records = [
            {"label": labels[e["labels"]], "predict": labels[p]} for e, p in zip(examples, predictions)
        ]
        right = sum(r["label"] == r["predict"] for r in records)
        return {"accuracy": round(100 * right / max(len(records), 1), 4)}, records
    predicted = [character_tags(e, p, labels) for e, p in zip(examples, predictions)]
    records = [{"tags": e["gold"], "predict": p} for e, p in zip(examples, predicted)]
    return span_scores([e["gold"] for e in examples], predicted), records


def write_predictions(path: str | Path, records: list[dict[str, Any]]) -> Path:
    """One JSON line per example: the gold label (or tags) and the prediction."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return atomic_write_text(path, lines)
