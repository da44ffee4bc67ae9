"""What a run trains and is scored on, for its task type (generation, or an NLU head: ``--task_type
seq_cls|token_cls``): the datasets, the scorers, the before/after table and the loss curve."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import datasets as hf_datasets
import torch

from .. import nlu, retention
from ..data import DataConfig, load_conversations, tokenize_for_generation, tokenize_for_training
from ..files import atomic_open, atomic_write_text
from ..generation import evaluate_dataset
from ..methods import tuning_of
from ..mixing import MixPlan
from .output import writing
from .settings import RunSettings, SettingsError

# ``score(name, examples)``: generate or predict, write the predictions under <output_dir>/<name>/, and score.
Scorer = Callable[[str, Any], dict[str, Any]]
# ``retain(name)``: score the general set (``ptuning_v2.retention``) with the model as it is now, write the probes'
# answers under <output_dir>/<name>/; the table's labels are its ``labels``.


@dataclass
class Datasets:
    train: Any = None
    eval_loss: Any = None  # tokenized for the loss (--eval_strategy)
    eval_generate: Any = None  # prompts only, for generate + score
    test: Any = None
    mix: MixPlan | None = None  # train holds the task's examples, then the mixed ones (--mix_file)


def _limit(dataset, n: int | None):
    return dataset.select(range(min(n, len(dataset)))) if n else dataset


def conversations(paths: list[str], config: DataConfig, cache_dir: str, seed: int) -> hf_datasets.Dataset:
    """One file's conversations, or several files' mixed (multi-task training): concatenated, then shuffled by
    the run's seed, so that ``--max_train_samples`` takes a sample of the mix and a seed always gives one mix."""
    parts = [load_conversations(path, config, cache_dir=cache_dir) for path in paths]
    return parts[0] if len(parts) == 1 else hf_datasets.concatenate_datasets(parts).shuffle(seed=seed)


def load_datasets(settings: RunSettings, tokenizer: Any, labels: list[Any] | None = None) -> Datasets:
    if settings.data.task_type != "generation":
        return load_nlu_datasets(settings, tokenizer, labels)
    data_args, args = settings.data, settings.training
    data_config = DataConfig(**{f.name: getattr(data_args, f.name) for f in fields(DataConfig)})
    cache_dir = str(Path(args.output_dir) / ".data_cache")

    def tokenized(paths: list[str], limit: int | None, for_generation: bool):
        raw = _limit(conversations(paths, data_config, cache_dir, args.seed), limit)
        if for_generation:
            return tokenize_for_generation(raw, tokenizer, data_config)
        dataset, stats = tokenize_for_training(raw, tokenizer, data_config)
        print(f"{','.join(paths)}: {stats.summary()}", flush=True)
        return dataset

    found = Datasets()
    # The cache is only a cache: one that a full disk cut short is removed, the next run builds it again.
    cache_write = writing(
        args.output_dir, "writing the tokenized-data cache", partial=cache_dir, removed=".data_cache"
    )
    with cache_write, args.main_process_first(desc="tokenize"):
        if args.do_train:
            found.train = tokenized(data_args.train_files(), data_args.max_train_samples, False)
            if data_args.mix_ratio and data_args.mix_files():
                # The general chats keep their own prompts: the task's --source_prefix is not theirs.
                mix_config = DataConfig(**{**asdict(data_config), "source_prefix": ""})
                raw = conversations(data_args.mix_files(), mix_config, cache_dir, args.seed)
                mixed, stats = tokenize_for_training(raw, tokenizer, mix_config)
                print(
                    f"{data_args.mix_file} (mix, {data_args.mix_ratio:g} of every batch): {stats.summary()}"
                )
                found.mix = MixPlan(data_args.mix_files(), data_args.mix_ratio, len(found.train), len(mixed))
                found.train = hf_datasets.concatenate_datasets([found.train, mixed])
        if data_args.validation_file and args.eval_strategy != "no":
            found.eval_loss = tokenized([data_args.validation_file], data_args.max_eval_samples, False)
        if data_args.validation_file and (args.do_eval or data_args.eval_generate_steps):
            found.eval_generate = tokenized([data_args.validation_file], data_args.max_eval_samples, True)
        if args.do_predict:
            found.test = tokenized([data_args.test_file], data_args.max_predict_samples, True)
    return found


def generation_scorer(settings: RunSettings, model: torch.nn.Module, tokenizer: Any) -> Scorer:
    """``score(name, dataset)``: generate, write ``<output_dir>/<name>/generated_predictions.txt``, and score."""
    args = settings.training
    output_dir, is_main = Path(args.output_dir), args.process_index == 0
    task = None if settings.data.task == "none" else settings.data.task

    def score(name: str, dataset) -> dict[str, Any]:
        target = (
            output_dir / name / "generated_predictions.txt"
            if name
            else output_dir / "generated_predictions.txt"
        )
        metrics = evaluate_dataset(
            model,
            tokenizer,
            dataset,
            settings.generation,
            target if is_main else None,
            task=task,
            progress=is_main,
            batch_size=args.per_device_eval_batch_size,
            seed=args.seed,
        )
        if is_main:
            print(f"[{name or 'eval'}] " + json.dumps(metrics, ensure_ascii=False), flush=True)
        return metrics

    return score


# ---------------------------------------------------------------- NLU heads (--task_type seq_cls|token_cls)


def nlu_labels(settings: RunSettings) -> list[Any] | None:
    """The head's label set: the training file's (sorted), or, without training, the checkpoint's; None for
    generation. A warm start from a checkpoint with another label set is refused (its head would not fit)."""
    data, task_type, checkpoint = settings.data, settings.data.task_type, settings.model.ptuning_checkpoint
    if task_type == "generation":
        return None
    recorded = nlu.read_labels(checkpoint) if checkpoint else None
    if recorded and recorded[0] != task_type:
        raise SettingsError(f"--ptuning_checkpoint {checkpoint} holds a {recorded[0]} head, not {task_type}")
    if settings.training.do_train:
        labels = nlu.label_set(nlu.read_rows(data.train_file, task_type), task_type, data.train_file)
        if recorded and recorded[1] != labels:
            raise SettingsError(
                f"--ptuning_checkpoint {checkpoint} was trained on the labels {recorded[1]}, --train_file "
                f"{data.train_file} has {labels}"
            )
        return labels
    if recorded is None:
        raise SettingsError(
            f"--ptuning_checkpoint {checkpoint}: no {nlu.LABELS_FILE} to say what the head's outputs mean"
        )
    return recorded[1]


def load_nlu_datasets(settings: RunSettings, tokenizer: Any, labels: list[Any]) -> Datasets:
    """Lists of tokenized examples (the Trainer takes any sized dataset); validation is tokenized once and serves
    both the loss (``--eval_strategy``) and the scores."""
    data_args, args = settings.data, settings.training

    def tokenized(path: str, limit: int | None) -> list[dict[str, Any]]:
        rows = nlu.read_rows(path, data_args.task_type)
        rows = rows[:limit] if limit else rows
        return nlu.tokenize_rows(
            rows, tokenizer, data_args.task_type, labels, data_args.max_source_length, path
        )

    found = Datasets()
    if args.do_train:
        found.train = tokenized(data_args.train_file, data_args.max_train_samples)
        print(f"{data_args.train_file}: {len(found.train)} examples, labels {labels}", flush=True)
    evaluating = args.do_eval or data_args.eval_generate_steps or args.eval_strategy != "no"
    if data_args.validation_file and evaluating:
        found.eval_generate = tokenized(data_args.validation_file, data_args.max_eval_samples)
        found.eval_loss = found.eval_generate if args.eval_strategy != "no" else None
    if args.do_predict:
        found.test = tokenized(data_args.test_file, data_args.max_predict_samples)
    return found


def nlu_scorer(settings: RunSettings, model: torch.nn.Module, tokenizer: Any, labels: list[Any]) -> Scorer:
    """``score(name, examples)``: predict with the head, write ``<output_dir>/<name>/predictions.jsonl``, and
    score (accuracy, or span P/R/F1)."""
    args, task_type = settings.training, settings.data.task_type
    output_dir, is_main = Path(args.output_dir), args.process_index == 0

    def score(name: str, examples: list[dict[str, Any]]) -> dict[str, Any]:
        predicted = nlu.predict(model, examples, tokenizer.pad_token_id, args.per_device_eval_batch_size)
        metrics, records = nlu.score(examples, predicted, task_type, labels)
        if is_main:
            nlu.write_predictions(output_dir / name / "predictions.jsonl", records)
            print(f"[{name or 'eval'}] " + json.dumps(metrics, ensure_ascii=False), flush=True)
        return metrics

    return score


def start_head(settings: RunSettings, labels: list[Any] | None, tokenizer: Any) -> dict[str, Any]:
    """For an NLU head: record its labels in the output directory, turn off ``--compare_with_base`` (a random
    head scores nothing without training) and ``--retention`` (a head does not generate), and return the ``load_model`` arguments that build it."""
    if labels is None:
        return {}
    task_type, args = settings.data.task_type, settings.training
    if settings.data.compare_with_base:
        print(
            f"note: --compare_with_base skipped for --task_type {task_type}: the task head starts random, so the "
            "backbone without the method has no score worth comparing",
            flush=True,
        )
        settings.data.compare_with_base = False
    if settings.data.retention:
        print(
            f"note: --retention skipped for --task_type {task_type}: a task head does not generate, so the general "
            "set's probes have no answers to score",
            flush=True,
        )
        settings.data.retention = False
    if args.do_train and args.should_save:
        nlu.write_labels(args.output_dir, task_type, labels)
    return nlu.model_kwargs(task_type, labels, tokenizer.pad_token_id)


# ---------------------------------------------------------------- reporting


class Retainer:
    """``retain(name)``: the retention metrics of the model as it is now (with its method on, or inside
    ``model.tuning.bare()``); the probes' answers go to ``<output_dir>/<name>/retention_answers.jsonl``."""

    def __init__(self, settings: RunSettings, model: torch.nn.Module, tokenizer: Any) -> None:
        data, args = settings.data, settings.training
        self.model, self.output_dir, self.is_main = model, Path(args.output_dir), args.process_index == 0
        self.set = retention.RetentionSet(
            data, tokenizer, args.per_device_eval_batch_size, data.max_source_length, data.max_target_length
        )
        self.labels = self.set.labels

    def __call__(self, name: str) -> dict[str, Any]:
        metrics, answers = self.set.score(self.model)
        if self.is_main:
            retention.write_answers(self.output_dir / name / retention.ANSWERS_FILE, answers)
            print(f"[retention {name or 'after'}] " + json.dumps(metrics, ensure_ascii=False), flush=True)
        return metrics


def evaluate_before_after(
    settings: RunSettings,
    model: torch.nn.Module,
    datasets: Datasets,
    score: Scorer,
    before: dict[str, Any] | None = None,
    retain: Retainer | None = None,
) -> dict[str, Any]:
    """Score the validation set with the method and (``--compare_with_base``) without it, and the general set
    (``--retention``) with and without it; write one table of both.

    ``before``: what the backbone alone scored before training (``"task"``, ``"retention"``), for full fine-tuning,
    which leaves no bare backbone afterwards. Returns ``{"eval": {"before", "after"}}`` for the task and
    ``{"retention": {"before", "after"}}`` for the general set, as far as each was scored."""
    before = dict(before or {})
    evaluating = datasets.eval_generate is not None
    handle = tuning_of(model)
    if not handle.saves_backbone:
        with handle.bare():
            if evaluating and settings.data.compare_with_base and "task" not in before:
                before["task"] = score("before", datasets.eval_generate)
            if retain is not None and "retention" not in before:
                before["retention"] = retain("before")
    after = {}
    if evaluating:
        after["task"] = score("", datasets.eval_generate)
    if retain is not None:
        after["retention"] = retain("")
    if settings.training.process_index == 0:
        table = comparison_table(
            before.get("task"), after.get("task"), handle.name, before.get("retention"), after.get("retention"),
            retain.labels if retain is not None else None,
        )  # fmt: skip
        what = (
            f"validation ({len(datasets.eval_generate)} examples, {settings.data.validation_file})"
            if evaluating
            else "retention"
        )
        print(f"\n{what}:\n{table}\n", flush=True)
        atomic_write_text(Path(settings.training.output_dir) / "eval_table.md", table + "\n")
    results: dict[str, Any] = {}
    if evaluating:
        results["eval"] = {"before": before.get("task"), "after": after["task"]}
    if retain is not None:
        results["retention"] = {"before": before["retention"], "after": after["retention"]}
    return results


def comparison_table(
    before: dict[str, Any] | None,
    after: dict[str, Any] | None,
    method: str = "prefix",
    retention_before: dict[str, Any] | None = None,
    retention_after: dict[str, Any] | None = None,
    retention_labels: dict[str, str] | None = None,
) -> str:
    """The before/after table: the task's metrics, then the retention rows (``retention: <label>``). A before
    column appears when anything was scored without the method; a task metric without it shows ``–``."""
    rows: list[tuple[str, float | None, float]] = []
    for key in [k for k in (after or {}) if k != "speed"]:
        rows.append((key, (before or {}).get(key), after[key]))
    for key, label in (retention_labels or {}).items():
        if retention_after and key in retention_after:
            rows.append((f"retention: {label}", (retention_before or {}).get(key), retention_after[key]))
    if before is None and retention_before is None:
        return "\n".join(["| metric | score |", "|---|---:|", *(f"| {k} | {a:.2f} |" for k, _, a in rows)])
    lines = [f"| metric | before (backbone alone) | after ({method}) | change |", "|---|---:|---:|---:|"]
    for key, b, a in rows:
        lines.append(
            f"| {key} | {b:.2f} | {a:.2f} | {a - b:+.2f} |"
            if b is not None
            else f"| {key} | – | {a:.2f} | – |"
        )
    return "\n".join(lines)


def plot_loss_curve(log_history: list[dict[str, Any]], path: Path) -> Path | None:
    steps = [(e["step"], e["loss"]) for e in log_history if "loss" in e]
    if not steps:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([s for s, _ in steps], [v for _, v in steps], label="train loss")
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    if evals:
        ax.plot([s for s, _ in evals], [v for _, v in evals], "o-", label="eval loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    with atomic_open(path, "wb") as f:  # a full disk leaves no half a PNG
        fig.savefig(f, format="png", dpi=120)
    plt.close(fig)
    return path
