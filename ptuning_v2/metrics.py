"""Evaluation metrics: the official ChatGLM generation scores plus task scores for the bundled tasks.

Generation metrics (``generation_metrics``) reproduce THUDM ChatGLM-6B / ChatGLM2-6B ``ptuning/main.py``:
each (prediction, label) pair is scored on its own and the per-pair scores are averaged.

- ROUGE-1/2/L: F-score of ``rouge_chinese`` on the ``jieba.cut`` words of both texts joined by spaces, ×100.
- BLEU-4 (``bleu="chars"``, the default): nltk ``sentence_bleu([list(label)], list(pred),
  smoothing_function=SmoothingFunction().method3)`` on *characters*, ×100.
- BLEU-4 (``bleu="words"``): the later ChatGLM3 / GLM-4 ``finetune_demo`` definition, the same call on
  ``jieba.lcut`` *word* lists and **not** multiplied by 100 (a 0..1 value). ROUGE is unchanged. The two
  "bleu-4" numbers are not comparable: different units (words vs characters) and different scales.

Differences from the upstream code, all on purpose:

- an empty or whitespace-only prediction or label scores 0 on every metric (upstream crashes, because
  ``rouge_chinese`` raises on empty input);
- only the final means are rounded to 4 decimals (upstream rounds every pair first; the reported means
  differ by at most 0.0001);
- texts are scored as given (the ChatGLM3 demo also ``.strip()``-s its decoded texts; the ChatGLM-6B code
  does not).

Character BLEU-4 of a text shorter than 4 characters is below 100 even for an exact match (e.g. "正面"
vs "正面" gives 59.46), which is why ``exact-match`` and the task metrics are reported alongside.

Task metrics: ``ner_scores`` (micro precision/recall/F1 over ``(type, entity)`` pairs, answer format in
``ptuning_v2.tasks``), ``accuracy`` (sentiment) and ``exact_match``, all ×100.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import jieba
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

from ptuning_v2.tasks import NER_TYPES, NO_ENTITY, SENTIMENT_LABELS, parse_entities

# jieba logs a dictionary-loading banner on first use; keep CLI and training logs clean.
jieba.setLogLevel(logging.WARNING)

GENERATION_KEYS: tuple[str, ...] = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
BLEU_MODES: tuple[str, ...] = ("chars", "words")
TASKS: tuple[str, ...] = ("auto", "ner", "sentiment", "none")

_ROUGE = Rouge()
_SMOOTHING = SmoothingFunction().method3


def _check_pairs(predictions: list[str], labels: list[str]) -> None:
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if not predictions:
        raise ValueError("no (prediction, label) pairs to score")


def _is_blank(words: list[str]) -> bool:
    return not "".join(words).strip()


def _pair_scores(prediction: str, label: str, bleu: str) -> dict[str, float]:
    hypothesis = list(jieba.cut(prediction))
    reference = list(jieba.cut(label))
    if _is_blank(hypothesis) or _is_blank(reference):
        return dict.fromkeys(GENERATION_KEYS, 0.0)
    rouge = _ROUGE.get_scores(" ".join(hypothesis), " ".join(reference))[0]
    scores = {key: rouge[key]["f"] * 100 for key in ("rouge-1", "rouge-2", "rouge-l")}
    if bleu == "chars":
        scores["bleu-4"] = sentence_bleu([list(label)], list(prediction), smoothing_function=_SMOOTHING) * 100
    else:
        scores["bleu-4"] = sentence_bleu([reference], hypothesis, smoothing_function=_SMOOTHING)
    return scores


def generation_metrics(predictions: list[str], labels: list[str], bleu: str = "chars") -> dict[str, float]:
    """Mean per-pair ROUGE-1/2/L F (×100) and BLEU-4 (×100 on chars, 0..1 on words); see module doc."""
    if bleu not in BLEU_MODES:
        raise ValueError(f"bleu must be one of {BLEU_MODES}, got {bleu!r}")
    _check_pairs(predictions, labels)
    totals = dict.fromkeys(GENERATION_KEYS, 0.0)
    for prediction, label in zip(predictions, labels):
        for key, value in _pair_scores(prediction, label, bleu).items():
            totals[key] += value
    return {key: round(total / len(predictions), 4) for key, total in totals.items()}


def _ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator else 0.0


def ner_scores(predictions: list[str], labels: list[str]) -> dict[str, float]:
    """Micro-averaged precision/recall/F1 (×100) over ``(type, entity)`` pairs.

    A malformed answer parses to fewer (or no) entities, so it loses recall instead of raising. When
    neither the gold labels nor the predictions contain any entity, everything scores 100.
    """
    _check_pairs(predictions, labels)
    correct = predicted = gold = 0
    for prediction, label in zip(predictions, labels):
        predicted_set, gold_set = parse_entities(prediction), parse_entities(label)
        correct += len(predicted_set & gold_set)
        predicted += len(predicted_set)
        gold += len(gold_set)
    if predicted == 0 and gold == 0:
        return {"entity-precision": 100.0, "entity-recall": 100.0, "entity-f1": 100.0}
    precision, recall = _ratio(correct, predicted), _ratio(correct, gold)
    f1 = _ratio(2 * precision * recall, precision + recall)
    return {
        "entity-precision": round(precision * 100, 4),
        "entity-recall": round(recall * 100, 4),
        "entity-f1": round(f1 * 100, 4),
    }


def exact_match(predictions: list[str], labels: list[str]) -> float:
    """Percentage of predictions equal to their label after stripping surrounding whitespace."""
    _check_pairs(predictions, labels)
    hits = sum(prediction.strip() == label.strip() for prediction, label in zip(predictions, labels))
    return round(hits / len(predictions) * 100, 4)


def accuracy(predictions: list[str], labels: list[str]) -> float:
    """Sentiment accuracy (×100): the stripped prediction must be exactly the label (``正面``/``负面``)."""
    return exact_match(predictions, labels)


def _is_ner_answer(text: str) -> bool:
    # ``无``, or ``类型：实体、…`` parts whose types appear in the fixed order, each at most once.
    text = text.strip()
    if text == NO_ENTITY:
        return True
    parts = [part.partition("：") for part in text.split("；")]
    if not all(sep and values for _, sep, values in parts):
        return False
    names = [name for name, _, _ in parts]
    return all(name in NER_TYPES for name in names) and names == sorted(set(names), key=NER_TYPES.index)


def detect_task(labels: list[str]) -> str | None:
    """``"sentiment"`` or ``"ner"`` when every label has that task's answer format, else ``None``."""
    if not labels:
        return None
    if all(label.strip() in SENTIMENT_LABELS for label in labels):
        return "sentiment"
    if all(_is_ner_answer(label) for label in labels) and any(label.strip() != NO_ENTITY for label in labels):
        return "ner"
    return None


def all_metrics(
    predictions: list[str], labels: list[str], task: str | None = "auto", bleu: str = "chars"
) -> dict[str, float]:
    """Generation metrics, ``exact-match`` and, for a known or detected task, its task metrics.

    ``task``: ``"auto"`` (detect from the labels), ``"ner"``, ``"sentiment"``, or ``"none"``/``None``.
    """
    if task not in TASKS and task is not None:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    resolved = detect_task(labels) if task == "auto" else task
    result = generation_metrics(predictions, labels, bleu=bleu)
    result["exact-match"] = exact_match(predictions, labels)
    if resolved == "ner":
        result.update(ner_scores(predictions, labels))
    elif resolved == "sentiment":
        result["accuracy"] = accuracy(predictions, labels)
    return result


_JSON_TYPE_NAMES = {dict: "object", list: "array", str: "string", int: "number", float: "number"}


def _json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def _parse_line(raw: bytes, where: str) -> tuple[str, str]:
    try:
        record = json.loads(raw.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise ValueError(f"{where}: not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where}: bad JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {_json_type(record)}")
    for key in ("labels", "predict"):
        if key not in record:
            present = ", ".join(repr(k) for k in record) or "none"
            raise ValueError(
                f"{where}: missing key {key!r} (keys present: {present}); a predictions file holds one "
                '{"labels": ..., "predict": ...} object a line, as generated_predictions.txt does'
            )
        if not isinstance(record[key], str):
            raise ValueError(f"{where}: {key!r} must be a string, got {_json_type(record[key])}")
    return record["predict"], record["labels"]


def read_predictions(path: str | Path) -> tuple[list[str], list[str]]:
    """Read ``generated_predictions.txt``: one ``{"labels": ..., "predict": ...}`` JSON object a line.

    Blank lines are skipped. Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming
    ``file:line`` for a malformed line, or naming the file when it holds no records.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if not path.is_file():
        raise ValueError(f"{path}: not a regular file")
    predictions: list[str] = []
    labels: list[str] = []
    # Read bytes so that an encoding error can still be reported with its line number.
    with path.open("rb") as handle:
        for line_number, raw in enumerate(handle, start=1):
            if not raw.strip():
                continue
            prediction, label = _parse_line(raw, f"{path}:{line_number}")
            predictions.append(prediction)
            labels.append(label)
    if not predictions:
        raise ValueError(f"{path}: no predictions (the file is empty)")
    return predictions, labels
