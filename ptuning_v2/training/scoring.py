"""What a run trains and is scored on, for its task type (generation, or an NLU head: ``--task_type
seq_cls|token_cls``): the datasets, the scorers, the before/after table and the loss curve."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import datasets as hf_datasets
import torch

from .. import nlu
from ..data import DataConfig, load_conversations, tokenize_for_generation, tokenize_for_training
from ..files import atomic_open, atomic_write_text
from ..generation import evaluate_dataset
from ..methods import tuning_of
from .output import writing
from .settings import RunSettings, SettingsError

# ``score(name, examples)``: generate or predict, write the predictions under <output_dir>/<name>/, and score.
Scorer = Callable[[str, Any], dict[str, Any]]


@dataclass
class Datasets:
    train: Any = None
    eval_loss: Any = None  # tokenized for the loss (--eval_strategy)
    eval_generate: Any = None  # prompts only, for generate + score
    test: Any = None


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
    head scores nothing without training), and return the ``load_model`` arguments that build it."""
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
    if args.do_train and args.should_save:
        nlu.write_labels(args.output_dir, task_type, labels)
    return nlu.model_kwargs(task_type, labels, tokenizer.pad_token_id)


# ---------------------------------------------------------------- reporting


def evaluate_before_after(
    settings: RunSettings,
    model: torch.nn.Module,
    datasets: Datasets,
    score: Scorer,
    before: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Score the validation set with the method, and (``--compare_with_base``) without it; write the table."""
    if before is None and settings.data.compare_with_base:
        with tuning_of(model).bare():
            before = score("before", datasets.eval_generate)
    after = score("", datasets.eval_generate)
    if settings.training.process_index == 0:
        table = comparison_table(before, after, tuning_of(model).name)
        print(
            f"\nvalidation ({len(datasets.eval_generate)} examples, {settings.data.validation_file}):\n{table}\n",
            flush=True,
        )
        atomic_write_text(Path(settings.training.output_dir) / "eval_table.md", table + "\n")
    return {"before": before, "after": after}


def comparison_table(before: dict[str, Any] | None, after: dict[str, Any], method: str = "prefix") -> str:
    keys = [k for k in after if k != "speed"]
    if before is None:
        rows = [f"| {k} | {after[k]:.2f} |" for k in keys]
        return "\n".join(["| metric | score |", "|---|---:|", *rows])
    rows = [f"| {k} | {before[k]:.2f} | {after[k]:.2f} | {after[k] - before[k]:+.2f} |" for k in keys]
    return "\n".join(
        [f"| metric | before (backbone alone) | after ({method}) | change |", "|---|---:|---:|---:|", *rows]
    )


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
