"""Train a prefix (P-Tuning v2 or Prefix-Tuning) over a frozen backbone with the HF Trainer.

    python -m ptuning_v2.train --model_name_or_path models/glm-zh-tiny --train_file data/ner/train.json \\
        --validation_file data/ner/dev.json --pre_seq_len 32 --output_dir output/ner --do_train --do_eval

Argument names follow THUDM's ChatGLM ``ptuning/main.py``; every ``Seq2SeqTrainingArguments`` flag works too
(``--deepspeed``, ``--gradient_checkpointing``, ``--resume_from_checkpoint``, ...). A single ``.json`` or ``.yaml``
file may replace the flags.

Every setting is checked before anything is loaded or written. A training run refuses an output directory that
holds an earlier run unless told to resume it (``--resume_from_checkpoint``) or to start over
(``--overwrite_output_dir``, which moves the earlier run aside). It stops, naming the step, on a non-finite loss, a
prefix whose weights grow past ``--max_prefix_weight`` or a prefix gradient that stays exactly 0. A full or
read-only disk during any of its writes ends it with one line naming the file system, what failed, the latest
complete checkpoint and how to resume (``training.output.writing``).

This file is the recipe; its parts live in ``ptuning_v2/training/``. A run, step by step (``main``):

1. Parse the flags or the settings file into ``RunSettings`` (``training.settings``); seed everything.
2. ``start_run`` (``training.output``): check every setting, the output directory and the checkpoint to resume;
   move an earlier run aside where told to; write ``run_config.yaml``. Nothing is loaded before this.
3. Load the tokenizer; for an NLU head (``--task_type seq_cls|token_cls``), find its label set.
4. ``build_model``: the backbone with the method attached, fresh or warm-started from ``--ptuning_checkpoint``.
5. Load and tokenize the datasets, and choose the scorer: generate and score, or predict with the head
   (``training.scoring``).
6. ``make_trainer`` (``training.trainer``): the HF Trainer hooked to save what the method trains, write
   checkpoints atomically and stop a run that went bad.
7. Full fine-tuning with ``--compare_with_base`` or ``--retention``: score the backbone first (no bare backbone is
   left afterwards).
8. ``train``: train (or resume), save the checkpoint, plot the loss curve.
9. Score the validation set and (``--retention``) the general set of ``ptuning_v2.retention``, with the method and
   without: one before/after table; predict on the test set, write ``all_results.json``.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

import torch
import transformers
from tqdm import tqdm
from transformers import set_seed

from .files import atomic_write_text
from .loading import load_model, load_tokenizer
from .methods import attach_method, count_parameters, read_checkpoint, tuning_of
from .training.output import OutputPlan, OutputWriteError, rotate_run_checkpoints, start_run, writing
from .training.scoring import (
    Retainer,
    conversations,
    evaluate_before_after,
    generation_scorer,
    load_datasets,
    nlu_labels,
    nlu_scorer,
    plot_loss_curve,
    start_head,
)
from .training.settings import PrefixTrainingArguments, RunSettings, SettingsError, parse_args
from .training.trainer import (
    NonFiniteError,
    SaturatedError,
    TrainingStopped,
    TuningTrainer,
    make_trainer,
)

# What other code and the tests take from here. PrefixTrainingArguments: the training_args.bin of checkpoints
# written before the split name it as ptuning_v2.train's, and unpickle through it.
__all__ = [
    "NonFiniteError",
    "OutputWriteError",
    "PrefixTrainingArguments",
    "RunSettings",
    "SaturatedError",
    "SettingsError",
    "TrainingStopped",
    "TuningTrainer",
    "build_model",
    "cli",
    "load_model",
    "load_tokenizer",
    "main",
    "parse_args",
    "rotate_run_checkpoints",
    "train",
]
_conversations = conversations  # the name tests/test_nlu.py imports

logger = logging.getLogger("ptuning_v2.train")


def build_model(settings: RunSettings, **model_kwargs: Any) -> torch.nn.Module:
    """The backbone with the method attached: fresh, or warm-started from ``--ptuning_checkpoint``.

    ``model_kwargs`` go to ``load_model`` (an NLU head: ``model_class``, ``num_labels``, ...)."""
    model_args = settings.model
    if model_args.ptuning_checkpoint:
        record = read_checkpoint(model_args.ptuning_checkpoint)
        found = record.method
        if found != model_args.method:
            raise SettingsError(
                f"--ptuning_checkpoint {model_args.ptuning_checkpoint} is a {found} checkpoint, but --method is "
                f"{model_args.method}; warm-start a method from its own checkpoints"
            )
        model = load_model(
            model_args.model_name_or_path,
            record,
            quantization_bit=model_args.quantization_bit,
            torch_dtype=model_args.torch_dtype,
            **model_kwargs,
        )
    else:
        model = load_model(
            model_args.model_name_or_path,
            quantization_bit=model_args.quantization_bit,
            torch_dtype=model_args.torch_dtype,
            **model_kwargs,
        )
        # The tokenizer: for a method that starts from a text's embeddings (Prompt Tuning's prompt_init text).
        tokenizer = load_tokenizer(model_args.model_name_or_path)
        attach_method(model, model_args.method, settings.method_config(), tokenizer=tokenizer)
    model.train()
    return model


def train(trainer: TuningTrainer, plan: OutputPlan) -> dict[str, Any]:
    output_dir = Path(trainer.args.output_dir)
    with writing(output_dir, "training"):  # TensorBoard logs; a checkpoint's save names itself
        result = trainer.train(resume_from_checkpoint=plan.resume)
    with writing(output_dir, "writing the final save (the trained weights in OUTPUT_DIR)"):
        trainer.save_model()
    if trainer.args.process_index == 0:
        with writing(output_dir, "plotting the loss curve (loss_curve.png)"):
            curve = plot_loss_curve(trainer.state.log_history, output_dir / "loss_curve.png")
        print(
            f"{tuning_of(trainer.model).name} checkpoint saved to {output_dir}; loss curve: {curve}",
            flush=True,
        )
    return result.metrics


def main(argv: list[str] | None = None) -> dict[str, Any]:
    settings = parse_args(argv)
    args = settings.training
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    set_seed(args.seed)
    logger.info("processes: %d, device: %s", args.world_size, args.device)
    plan = start_run(settings)
    tokenizer = load_tokenizer(settings.model.model_name_or_path)
    labels = nlu_labels(settings)
    model = build_model(settings, **start_head(settings, labels, tokenizer))
    trainable, total = count_parameters(model)
    print(
        f"{settings.model.method}: trainable {trainable:,} / total {total:,} ({100 * trainable / total:.4f}%)",
        flush=True,
    )
    datasets = load_datasets(settings, tokenizer, labels)
    if labels is None:
        score = generation_scorer(settings, model, tokenizer)
    else:
        score = nlu_scorer(settings, model, tokenizer, labels)
    trainer = make_trainer(settings, model, tokenizer, datasets, score, labels)

    results: dict[str, Any] = {}
    output_dir = Path(args.output_dir)
    evaluating = args.do_eval and datasets.eval_generate is not None
    # The general set is read (and a bad file named) before training, not after it.
    retain = Retainer(settings, model, tokenizer) if settings.data.retention else None
    before: dict[str, Any] = {}
    if tuning_of(model).saves_backbone:
        # Full fine-tuning leaves no bare backbone afterwards: score it first.
        with writing(output_dir, "writing the backbone's predictions on the validation set"):
            if evaluating and settings.data.compare_with_base:
                before["task"] = score("before", datasets.eval_generate)
            if retain is not None:
                before["retention"] = retain("before")
    if args.do_train:
        results["train"] = train(trainer, plan)
    if evaluating or retain is not None:
        parts = ["the validation set"] if evaluating else []
        sets = " and ".join(parts + (["the general set (--retention)"] if retain is not None else []))
        with writing(output_dir, f"writing the predictions and scores of {sets}"):
            results.update(evaluate_before_after(settings, model, datasets, score, before, retain))
    if datasets.test is not None:
        with writing(output_dir, "writing the predictions of the test set"):
            results["predict"] = score("predict", datasets.test)
    if args.process_index == 0:
        with writing(output_dir, "writing all_results.json"):
            atomic_write_text(
                output_dir / "all_results.json",
                json.dumps(results, indent=2, ensure_ascii=False, default=str),
            )
    return results


def cli(argv: list[str] | None = None) -> int:
    """One ``error:`` line per problem and exit 1, instead of a traceback, for what a user can fix."""
    try:
        main(argv)
    # OutputWriteError: a full or read-only disk (an OSError too); OSError: missing files, Hub/loading errors
    except (TrainingStopped, ValueError, OutputWriteError, OSError) as err:
        # A progress bar that the failure left open would glue itself to the error line and redraw after it.
        for bar in list(getattr(tqdm, "_instances", ())):
            bar.close()
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    # Run the importable module, not __main__, so the arguments saved in checkpoints unpickle by name.
    from ptuning_v2.train import cli as _cli

    sys.exit(_cli())
