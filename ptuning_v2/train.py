"""Train a prefix (P-Tuning v2 or Prefix-Tuning) over a frozen backbone with the HF Trainer.

    python -m ptuning_v2.train --model_name_or_path models/glm-zh-tiny --train_file data/ner/train.json \\
        --validation_file data/ner/dev.json --pre_seq_len 32 --output_dir output/ner --do_train --do_eval

Argument names follow THUDM's ChatGLM ``ptuning/main.py``; every ``Seq2SeqTrainingArguments`` flag works too
(``--deepspeed``, ``--gradient_checkpointing``, ``--resume_from_checkpoint``, ...). A single ``.json`` or ``.yaml``
file may replace the flags. Flow: check settings -> data -> tokenize -> Trainer(prefix model) -> prefix checkpoint
-> evaluate.

Every setting is checked before anything is loaded or written. A training run refuses an output directory that
holds an earlier run unless told to resume it (``--resume_from_checkpoint``) or to start over
(``--overwrite_output_dir``, which moves the earlier run aside). It stops, naming the step, on a non-finite loss, a
prefix whose weights grow past ``--max_prefix_weight`` or a prefix gradient that stays exactly 0.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import os
import re
import shutil
import sys
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import transformers
import transformers.trainer
import yaml
from accelerate import PartialState
from transformers import (
    HfArgumentParser,
    Seq2SeqTrainingArguments,
    Trainer,
    TrainerCallback,
    get_scheduler,
    set_seed,
)
from transformers.hf_argparser import string_to_bool
from transformers.integrations.deepspeed import deepspeed_load_checkpoint
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint

from .attach import attach_prefix, count_parameters, prefix_disabled
from .checkpoint import load_prefix, load_prefix_checkpoint, load_prefix_weights
from .data import (
    DataConfig,
    load_conversations,
    tokenize_for_generation,
    tokenize_for_training,
    training_collator,
)
from .evaluate import BOOLEAN_WORDS, parse_bool
from .generation import GenerationSettings, evaluate_dataset
from .loading import check_model_path, load_model, load_tokenizer, quantization_config, resolve_dtype
from .metrics import TASKS
from .prefix_encoder import PrefixConfig

logger = logging.getLogger("ptuning_v2.train")
METHODS = ("ptuning_v2", "prefix_tuning")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="models/glm-zh-tiny", metadata={"help": "backbone directory"})
    ptuning_checkpoint: str | None = field(
        default=None, metadata={"help": "prefix to start from (any format)"}
    )
    method: str = field(
        default="ptuning_v2", metadata={"help": "ptuning_v2 (deep prompt) or prefix_tuning (MLP)"}
    )
    pre_seq_len: int = 128
    prefix_projection: bool = False
    prefix_hidden_size: int | None = None
    prefix_dropout: float = 0.1
    position_convention: str = field(
        default="chatglm", metadata={"help": "chatglm (from 0) or peft (from P)"}
    )
    quantization_bit: str | None = field(default=None, metadata={"help": "4 (nf4), 8, or none"})
    torch_dtype: str | None = field(default=None, metadata={"help": "fp32, bf16, fp16; default fp32 on CPU"})


@dataclass
class DataArguments(DataConfig):
    """The data settings of ``DataConfig`` (columns, lengths, source prefix) plus the run's data options."""

    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_predict_samples: int | None = None
    task: str = field(default="auto", metadata={"help": "ner, sentiment, none or auto (from the labels)"})
    max_new_tokens: int = 128
    do_sample: bool = False
    top_p: float = 0.7
    temperature: float = 0.95
    eval_generate_steps: int = field(
        default=0, metadata={"help": "also generate+score every N steps (0: off)"}
    )
    compare_with_base: bool = field(default=False, metadata={"help": "score the backbone without prefix too"})


@dataclass
class PrefixTrainingArguments(Seq2SeqTrainingArguments):
    """``Seq2SeqTrainingArguments`` plus this recipe's guards (transformers 5 dropped ``overwrite_output_dir``)."""

    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "train into an output directory that holds an earlier run; that run is first moved aside to "
            "<output_dir>/overwritten-<time>/"
        },
    )
    max_prefix_weight: float = field(
        default=1e4,
        metadata={"help": "stop when a prefix weight grows past this magnitude (saturated prefix); 0: off"},
    )
    zero_grad_patience: int = field(
        default=10,
        metadata={
            "help": "stop after this many optimizer steps in a row whose prefix gradient is exactly 0; 0: off "
            "(a non-finite gradient stops at once)"
        },
    )


class _ArgumentParser(HfArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for action in self._actions:  # every boolean flag takes the spellings of parse_bool
            if action.type is string_to_bool:
                action.type = parse_bool

    def error(self, message: str):  # argparse would print a usage of some 200 flags before the one line
        self.exit(2, f"error: {message} (--help lists the flags)\n")


def parse_args(
    argv: list[str] | None = None,
) -> tuple[ModelArguments, DataArguments, PrefixTrainingArguments]:
    parser = _ArgumentParser((ModelArguments, DataArguments, PrefixTrainingArguments))
    argv = list(sys.argv[1:] if argv is None else argv)
    # Without CUDA, accelerate sees a torchrun/DeepSpeed job as one process unless told it runs on CPU.
    cpu_only = not torch.cuda.is_available()
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        text = Path(argv[0]).read_text()
        settings = json.loads(text) if argv[0].endswith(".json") else yaml.safe_load(text)
        if not isinstance(settings, dict):
            raise ValueError(f"{argv[0]}: expected a mapping of argument names to values")
        if cpu_only:
            settings.setdefault("use_cpu", True)
        return parser.parse_dict(settings)
    if cpu_only and "--use_cpu" not in argv:
        argv += ["--use_cpu", "true"]
    return parser.parse_args_into_dataclasses(args=argv)


def prefix_config(args: ModelArguments) -> PrefixConfig:
    if args.method not in METHODS:
        raise ValueError(f"--method {args.method!r} is not one of {METHODS}")
    return PrefixConfig(
        pre_seq_len=args.pre_seq_len,
        prefix_projection=args.prefix_projection or args.method == "prefix_tuning",
        prefix_hidden_size=args.prefix_hidden_size,
        prefix_dropout=args.prefix_dropout,
        position_convention=args.position_convention,
    )


def build_model(args: ModelArguments) -> torch.nn.Module:
    """Frozen backbone + prefix: fresh, or warm-started from ``--ptuning_checkpoint``."""
    model = load_model(
        args.model_name_or_path, quantization_bit=args.quantization_bit, torch_dtype=args.torch_dtype
    )
    if args.ptuning_checkpoint:
        load_prefix(model, args.ptuning_checkpoint)
    else:
        attach_prefix(model, prefix_config(args))
    model.train()
    return model


# ---------------------------------------------------------------- checks before anything is loaded or written


class SettingsError(ValueError):
    """Settings that cannot work, found before anything is loaded; one line per problem, each naming the flag."""


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


def settings_problems(
    model_args: ModelArguments, data_args: DataArguments, args: PrefixTrainingArguments
) -> list[str]:
    """Everything wrong with the settings, each as ``--flag value: what is wrong``; empty when all is well."""
    problems: list[str] = []

    def need(ok: bool, flag: str, value: Any, rule: str) -> None:
        if not ok:
            problems.append(f"--{flag} {_shown(value)}: {rule}")

    def count(flag: str, value: Any, what: str, optional: bool = False) -> None:
        if optional and value is None:
            return
        unset = " (leave it out for all of them)" if optional else ""
        need(
            isinstance(value, int) and value >= 1, flag, value, f"must be a positive number of {what}{unset}"
        )

    def data_file(flag: str, path: str | None, needed_by: str | None) -> None:
        if not path:
            if needed_by:
                problems.append(f"{needed_by} --{flag}")
            return
        if Path(path).is_dir():
            problems.append(f"--{flag} {path!r} is a directory, not a data file")
        elif not Path(path).is_file():
            problems.append(f"--{flag} {path!r} does not exist")

    try:
        check_model_path(model_args.model_name_or_path)
    except FileNotFoundError as err:
        problems.append(f"--model_name_or_path: {err}")
    if model_args.ptuning_checkpoint and not Path(model_args.ptuning_checkpoint).exists():
        problems.append(f"--ptuning_checkpoint {model_args.ptuning_checkpoint!r} does not exist")
    need(model_args.method in METHODS, "method", model_args.method, f"must be one of {', '.join(METHODS)}")
    need(
        model_args.position_convention in ("chatglm", "peft"),
        "position_convention",
        model_args.position_convention,
        "must be chatglm or peft",
    )
    count("pre_seq_len", model_args.pre_seq_len, "prefix tokens")
    count("prefix_hidden_size", model_args.prefix_hidden_size, "units", optional=True)
    need(0 <= model_args.prefix_dropout < 1, "prefix_dropout", model_args.prefix_dropout, "must be in [0, 1)")
    for check, flag, value in (
        (lambda v: quantization_config(v, torch.float32), "quantization_bit", model_args.quantization_bit),
        (resolve_dtype, "torch_dtype", model_args.torch_dtype),
    ):
        try:
            check(value)
        except ValueError as err:
            problems.append(f"--{flag} {_shown(value)}: {err}")

    data_file("train_file", data_args.train_file, "--do_train needs" if args.do_train else None)
    evaluating = args.do_eval or data_args.eval_generate_steps
    data_file(
        "validation_file",
        data_args.validation_file,
        "--do_eval and --eval_generate_steps need" if evaluating else None,
    )
    data_file(
        "test_file",
        data_args.test_file if args.do_predict else None,
        "--do_predict needs" if args.do_predict else None,
    )
    for flag in ("max_train_samples", "max_eval_samples", "max_predict_samples"):
        count(flag, getattr(data_args, flag), "examples", optional=True)
    count("max_source_length", data_args.max_source_length, "tokens")
    count("max_target_length", data_args.max_target_length, "tokens")
    count("max_new_tokens", data_args.max_new_tokens, "tokens")
    need(data_args.task in TASKS, "task", data_args.task, f"must be one of {', '.join(TASKS)}")
    need(0 < data_args.top_p <= 1, "top_p", data_args.top_p, "must be in (0, 1]")
    need(data_args.temperature > 0, "temperature", data_args.temperature, "must be above 0")
    need(
        data_args.eval_generate_steps >= 0,
        "eval_generate_steps",
        data_args.eval_generate_steps,
        "must be 0 (off) or a positive number of steps",
    )

    count("per_device_train_batch_size", args.per_device_train_batch_size, "examples")
    count("per_device_eval_batch_size", args.per_device_eval_batch_size, "examples")
    count("gradient_accumulation_steps", args.gradient_accumulation_steps, "batches")
    if args.do_train:
        need(
            math.isfinite(args.learning_rate) and args.learning_rate > 0,
            "learning_rate",
            args.learning_rate,
            "must be a positive number",
        )
        need(
            args.max_steps >= 1 or args.max_steps == -1,
            "max_steps",
            args.max_steps,
            "must be a positive number of steps (or -1 to train --num_train_epochs)",
        )
        if args.max_steps == -1:
            need(args.num_train_epochs > 0, "num_train_epochs", args.num_train_epochs, "must be above 0")
        if getattr(args.save_strategy, "value", args.save_strategy) == "steps":
            need(
                args.save_steps > 0,
                "save_steps",
                args.save_steps,
                "must be a positive number of steps (or a fraction of the run below 1)",
            )
    need(args.max_grad_norm >= 0, "max_grad_norm", args.max_grad_norm, "must be 0 (no clipping) or above")
    need(
        args.max_prefix_weight >= 0,  # False for nan too
        "max_prefix_weight",
        args.max_prefix_weight,
        "must be 0 (off) or a positive bound",
    )
    need(
        args.zero_grad_patience >= 0,
        "zero_grad_patience",
        args.zero_grad_patience,
        "must be 0 (off) or a positive number of steps",
    )
    if isinstance(args.deepspeed, str) and not Path(args.deepspeed).is_file():
        problems.append(f"--deepspeed {args.deepspeed!r}: no such DeepSpeed config file")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        problems.append(f"--output_dir {args.output_dir!r} is a file, not a directory")
    return problems


def check_settings(
    model_args: ModelArguments, data_args: DataArguments, args: PrefixTrainingArguments
) -> None:
    problems = settings_problems(model_args, data_args, args)
    if problems:
        raise SettingsError("\nerror: ".join(problems))


# Entries of an output directory that are not an earlier run: our data cache, and runs moved aside before.
_NOT_A_RUN = re.compile(r"\.data_cache|overwritten-.*|superseded-.*")
_CHECKPOINT = re.compile(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)")


def checkpoints_in(directory: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` of every ``checkpoint-N`` folder, by step."""
    if not directory.is_dir():
        return []
    found = ((_CHECKPOINT.fullmatch(p.name), p) for p in directory.iterdir() if p.is_dir())
    return sorted((int(match.group(1)), p) for match, p in found if match)


def _listing(names: list[str], limit: int = 6) -> str:
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


@dataclass
class OutputPlan:
    """What a training run does with its output directory: the checkpoint it resumes, what it moves aside."""

    resume: str | None = None
    move: list[Path] = field(default_factory=list)
    aside_kind: str = ""  # "overwritten" or "superseded"
    why: str = ""

    def carry_out(self, output_dir: Path) -> Path | None:
        if not self.move:
            return None
        stamp = time.strftime("%Y%m%d-%H%M%S")
        target, n = output_dir / f"{self.aside_kind}-{stamp}", 1
        while target.exists():
            target, n = output_dir / f"{self.aside_kind}-{stamp}-{n}", n + 1
        target.mkdir()
        for path in self.move:
            os.replace(path, target / path.name)
        names = _listing([p.name for p in self.move])
        print(f"note: {self.why}: moved {names} to {target}/ (delete it when no longer needed)", flush=True)
        return target


def resume_setting(value: str | bool | None) -> str | bool | None:
    """``--resume_from_checkpoint``: a path, True for the latest in the output directory, or None."""
    if value is None or isinstance(value, bool):
        return value or None
    word = value.strip().lower()
    if word in ("", "none"):
        return None
    if word == "latest":
        return True
    return BOOLEAN_WORDS.get(word, value) or None


def _learning_rate_at(args: PrefixTrainingArguments, total_steps: int, step: int) -> float | None:
    """The learning rate the run's schedule gives at ``step`` of ``total_steps``; None where that can't be told."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=args.learning_rate)
    try:
        scheduler = get_scheduler(
            args.lr_scheduler_type,
            optimizer,
            num_warmup_steps=args.get_warmup_steps(total_steps),
            num_training_steps=total_steps,
            scheduler_specific_kwargs=args.lr_scheduler_kwargs or {},
        )
    except (ValueError, TypeError):
        return None
    lambdas = getattr(scheduler, "lr_lambdas", None)  # LambdaLR: every schedule but reduce_lr_on_plateau
    return args.learning_rate * lambdas[0](step) if lambdas else None


def _check_resumed_schedule(args: PrefixTrainingArguments, checkpoint: Path, is_main: bool) -> int:
    """Refuse a resume with nothing left to train; warn when another --max_steps bends the schedule. The step."""
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    step, planned = int(state.get("global_step", 0)), int(state.get("max_steps", 0))
    if args.max_steps <= 0:
        return step
    if step >= args.max_steps:
        raise SettingsError(
            f"--resume_from_checkpoint {checkpoint} is at step {step} and --max_steps is {args.max_steps}: "
            f"nothing is left to train. Raise --max_steps (MAX_STEPS) above {step}"
        )
    if planned <= 0 or planned == args.max_steps:
        return step
    before, after = _learning_rate_at(args, planned, step), _learning_rate_at(args, args.max_steps, step)
    if before is not None and after is not None and math.isclose(before, after, rel_tol=1e-9, abs_tol=0):
        return step  # e.g. a constant schedule: nothing jumps
    jump = f" (from {before:.4g} to {after:.4g})" if before is not None and after is not None else ""
    schedule = getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type)
    if is_main:
        print(
            f"warning: {checkpoint} is step {step} of a run planned for --max_steps {planned}, and this run has "
            f"--max_steps {args.max_steps}: the {schedule} learning-rate schedule is recomputed for "
            f"{args.max_steps} steps, so the learning rate jumps at step {step}{jump}. Resume with --max_steps "
            f"{planned} (MAX_STEPS={planned}) to continue the same schedule.",
            file=sys.stderr,
            flush=True,
        )
    return step


def _earlier_run(output_dir: Path) -> list[Path]:
    """What an earlier run left in the output directory: its checkpoints by step, then everything else."""
    if not output_dir.is_dir():
        return []
    checkpoints = [path for _, path in checkpoints_in(output_dir)]
    others = sorted(
        p for p in output_dir.iterdir() if p not in checkpoints and not _NOT_A_RUN.fullmatch(p.name)
    )
    return checkpoints + others


def plan_output_dir(args: PrefixTrainingArguments, is_main: bool = True) -> OutputPlan:
    """Check the output directory and the checkpoint to resume, before anything is loaded; changes nothing.

    A new run needs an output directory without an earlier run in it, or ``--overwrite_output_dir`` (the earlier
    run is moved aside, so its checkpoints cannot be mistaken for this run's). A resumed run continues a
    checkpoint; the checkpoints of its directory past that step belong to the run it branches from, and are
    moved aside with that run's final files.
    """
    output_dir = Path(args.output_dir)
    resume = resume_setting(args.resume_from_checkpoint)
    if not args.do_train:
        return OutputPlan()
    if resume is True:
        resume = get_last_checkpoint(str(output_dir)) if output_dir.is_dir() else None
        if resume is None:
            raise SettingsError(
                f"--resume_from_checkpoint true: {output_dir} holds no {PREFIX_CHECKPOINT_DIR}-N folder to resume "
                "from; give a checkpoint's path, or leave the flag out to start a new run"
            )
    earlier = _earlier_run(output_dir)
    if resume:
        checkpoint = Path(resume)
        if not checkpoint.is_dir():
            raise SettingsError(f"--resume_from_checkpoint {resume!r}: no such checkpoint directory")
        if not (checkpoint / "trainer_state.json").is_file():
            raise SettingsError(
                f"--resume_from_checkpoint {resume!r} is not a training checkpoint (it has no trainer_state.json); "
                "to start a new run from a trained prefix, give it as --ptuning_checkpoint"
            )
        step = _check_resumed_schedule(args, checkpoint, is_main)
        if checkpoint.resolve().parent == output_dir.resolve():  # continuing the run of this directory
            if not any(n > step for n, _ in checkpoints_in(output_dir)):
                return OutputPlan(resume=str(checkpoint))
            ours = {path for n, path in checkpoints_in(output_dir) if n <= step}
            return OutputPlan(
                resume=str(checkpoint),
                move=[path for path in earlier if path not in ours],
                aside_kind="superseded",
                why=f"resuming {checkpoint.name} (step {step}), which the run in {output_dir} went past",
            )
    if earlier and not args.overwrite_output_dir:
        raise SettingsError(
            f"output directory {output_dir} already holds an earlier run ({_listing([p.name for p in earlier])}). "
            "Continue it with --resume_from_checkpoint true (RESUME=true in scripts/train_pt2.sh), or start over "
            f"with --overwrite_output_dir true (OVERWRITE=true), which first moves it aside to "
            f"{output_dir}/overwritten-<time>/; or choose another --output_dir"
        )
    why = f"--overwrite_output_dir: {output_dir} held an earlier run"
    return OutputPlan(resume=str(resume) if resume else None, move=earlier, aside_kind="overwritten", why=why)


# ---------------------------------------------------------------- the Trainer, only where hooks demand it


class TrainingStopped(RuntimeError):
    """The run stopped itself because its loss or prefix went bad; nothing broken was saved."""


class NonFiniteError(TrainingStopped):
    """The loss, the prefix or its gradient is inf/nan."""


class SaturatedError(TrainingStopped):
    """The prefix grew past --max_prefix_weight, or its gradient stayed exactly 0: training cannot recover."""


def _stopped(error: type[TrainingStopped], what: str, args: Any) -> TrainingStopped:
    last = get_last_checkpoint(args.output_dir) if os.path.isdir(args.output_dir) else None
    return error(
        f"{what}; stopping without saving it. Last good checkpoint: {last or 'none yet'}. "
        f"Lower the learning rate (--learning_rate {args.learning_rate:g}) or check the data."
    )


def _prefix_encoder(model: torch.nn.Module) -> torch.nn.Module:
    while not hasattr(model, "prefix_encoder") and hasattr(model, "module"):  # DDP / DeepSpeed wrappers
        model = model.module
    return model.prefix_encoder


class TrainingHealthCallback(TrainerCallback):
    """Stop a run whose prefix has blown up or no longer learns, naming the step; nothing of it is saved.

    * A prefix weight larger than ``--max_prefix_weight`` (1e4) in magnitude after an optimizer step: the prefix
      has saturated, attention to it is all-or-nothing and its gradient is ~0, so the run cannot recover. In the
      bundled main job (lr 0.1, 700 steps) no prefix weight passes 10 and the gradient norm stays within
      0.034-0.22 at every step; Adam moves each weight by about the learning rate a step, so an absurd learning
      rate (1e4 and up) passes the bound at its first step.
    * A prefix gradient that is exactly 0 for ``--zero_grad_patience`` (10) optimizer steps in a row: the loss no
      longer depends on the prefix. (A non-finite loss or gradient stops at once: ``PrefixTrainer.training_step``.)

    Checked on every process alike: gradients are equal across data-parallel processes, and the largest weight
    is reduced across them (ZeRO-3 gives each only a partition). Under DeepSpeed the gradient check is skipped
    (it keeps gradients in its own buffers).
    """

    def __init__(self) -> None:
        self.zero_since: int | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        grads = [p.grad for p in _prefix_encoder(model).parameters() if p.grad is not None]
        if not grads or not args.zero_grad_patience:  # DeepSpeed keeps gradients in its own buffers
            return
        step = state.global_step + 1
        if any(g.count_nonzero() for g in grads):  # after clipping, which keeps a zero gradient zero
            self.zero_since = None
            return
        self.zero_since = self.zero_since or step
        if step - self.zero_since + 1 >= args.zero_grad_patience:
            raise _stopped(
                SaturatedError,
                f"the prefix's gradient has been exactly 0 since step {self.zero_since} ({args.zero_grad_patience} "
                f"optimizer steps in a row, up to step {step}; --zero_grad_patience): the loss no longer depends "
                "on the prefix, which has most likely saturated",
                args,
            )

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None or not args.max_prefix_weight:
            return
        values = [getattr(p, "ds_tensor", p).detach() for p in _prefix_encoder(model).parameters()]
        largest = torch.stack(
            [v.abs().max().float().cpu() if v.numel() else torch.zeros(()) for v in values]
        ).max()
        largest = largest.to(args.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(largest, op=dist.ReduceOp.MAX)
        largest = largest.item()
        if not math.isfinite(largest):
            raise _stopped(
                NonFiniteError,
                f"the prefix weights are no longer finite ({largest}) after step {state.global_step}",
                args,
            )
        if largest > args.max_prefix_weight:
            raise _stopped(
                SaturatedError,
                f"the prefix has saturated at step {state.global_step}: a weight of magnitude {largest:.3g}, past "
                f"--max_prefix_weight {args.max_prefix_weight:g} (normal runs stay far below it), leaves attention "
                "all-or-nothing and the gradient ~0",
                args,
            )


def rotate_run_checkpoints(run_dir: str, limit: int | None, step: int, best: str | None = None) -> None:
    """Keep this run's newest ``limit`` checkpoints (and the best one), deleting older ones.

    transformers' ``rotate_checkpoints`` sorts every ``checkpoint-N`` of the folder by N, so another run's higher
    steps would outlive this run's; here a checkpoint past the current step is never counted nor deleted.
    (``plan_output_dir`` moves such checkpoints aside before a run starts.)
    """
    if not limit or limit <= 0:
        return
    ours = [path for n, path in checkpoints_in(Path(run_dir)) if n <= step]
    keep = set(ours[-limit:]) | ({Path(best)} if best else set())
    for path in ours:
        if path not in keep:
            shutil.rmtree(path, ignore_errors=True)


class PrefixTrainer(Trainer):
    """Saves only the prefix, writes checkpoints atomically, and stops on a non-finite loss or a broken prefix."""

    def __init__(self, model: torch.nn.Module, **kwargs: Any) -> None:
        # The health checks come first, so that no other callback acts on a step that broke the prefix.
        kwargs["callbacks"] = [TrainingHealthCallback(), *(kwargs.get("callbacks") or [])]
        # The Trainer refuses a quantized model without a PEFT adapter; the prefix is our trainable adapter.
        flag = getattr(model, "is_quantized", False) and not getattr(model, "_hf_peft_config_loaded", False)
        if flag:
            model._hf_peft_config_loaded = True
        try:
            super().__init__(model=model, **kwargs)
        finally:
            if flag:
                model._hf_peft_config_loaded = False

    def _stop(self, what: str) -> None:
        raise _stopped(NonFiniteError, f"{what} at step {self.state.global_step}", self.args)

    def _check_finite_prefix(self) -> None:
        model = self.accelerator.unwrap_model(self.model)
        # Under ZeRO-3 each process sees only its partition; the loss check covers what this misses.
        if not all(torch.isfinite(p.detach()).all() for p in model.prefix_encoder.parameters()):
            self._stop("the prefix weights are no longer finite (inf/nan)")

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        self._check_finite_prefix()
        output_dir = output_dir or self.args.output_dir
        model = self.accelerator.unwrap_model(self.model)
        params = list(model.prefix_encoder.parameters())
        with _gathered(params, self.is_deepspeed_enabled):
            if self.args.should_save:
                model.save_prefix(output_dir)
                torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.is_deepspeed_enabled:
            return super()._save_optimizer_and_scheduler(output_dir)
        # DeepSpeed would otherwise write the frozen backbone into every checkpoint.
        engine = self.model_wrapped
        engine.save_checkpoint = functools.partial(engine.save_checkpoint, exclude_frozen_parameters=True)
        try:
            super()._save_optimizer_and_scheduler(output_dir)
        finally:
            del engine.save_checkpoint

    def _save_checkpoint(self, model: torch.nn.Module, trial: Any) -> None:
        """Write ``checkpoint-N`` in a staging folder and rename it when complete."""
        self._check_finite_prefix()
        run_dir = self.args.output_dir
        final = os.path.join(run_dir, f"checkpoint-{self.state.global_step}")
        staging_root = os.path.join(run_dir, ".staging")
        self.args.output_dir = staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.output_dir = run_dir
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            if os.path.exists(final):
                shutil.rmtree(final)
            os.replace(os.path.join(staging_root, f"checkpoint-{self.state.global_step}"), final)
            shutil.rmtree(staging_root, ignore_errors=True)
        best = self.state.best_model_checkpoint
        if best and Path(best).parent == Path(staging_root):  # the Trainer named it inside the staging folder
            self.state.best_model_checkpoint = os.path.join(run_dir, Path(best).name)
            if self.args.should_save:
                self.state.save_to_json(os.path.join(final, "trainer_state.json"))
        if self.args.should_save:
            rotate_run_checkpoints(
                run_dir, self.args.save_total_limit, self.state.global_step, self.state.best_model_checkpoint
            )
        self.accelerator.wait_for_everyone()

    def _load_from_checkpoint(
        self, resume_from_checkpoint: str, model: torch.nn.Module | None = None
    ) -> None:
        model = self.accelerator.unwrap_model(model or self.model)
        load_prefix_weights(model, load_prefix_checkpoint(resume_from_checkpoint))

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # The gradient is checked here, before clipping can hide an inf (it scales everything by max_norm/inf = 0).
        # Under fp16 an inf gradient is the loss scaler's to skip; DeepSpeed keeps gradients in its own buffers.
        # The norm is the one clipping computes: past float32's range it is inf even where every element is finite.
        grads = [p.grad.detach() for p in _prefix_encoder(model).parameters() if p.grad is not None]
        norm = (
            torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
            if grads
            else None
        )
        grad_ok = self.args.fp16 or norm is None or bool(torch.isfinite(norm))
        bad = torch.tensor([float(not torch.isfinite(loss).all()), float(not grad_ok)], device=loss.device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(bad)  # every process stops together, or the others would hang
        step = self.state.global_step + 1
        if bad[0] > 0:
            self._stop(f"the loss is {loss.item()} (before the optimizer step {step})")
        if bad[1] > 0:
            shown = "not finite" if norm is None else f"{norm.item()}"
            raise _stopped(NonFiniteError, f"the prefix's gradient norm is {shown} at step {step}", self.args)
        return loss


def _gathered(params: list[torch.nn.Parameter], deepspeed_enabled: bool):
    """ZeRO-3 partitions even the prefix; gather just it (never the backbone) to save."""
    if deepspeed_enabled:
        import deepspeed

        return deepspeed.zero.GatheredParameters(params, modifier_rank=None)
    return contextlib.nullcontext()


def _deepspeed_load_prefix_only(engine, checkpoint_path, load_module_strict=True):
    # Our DeepSpeed checkpoints exclude the frozen backbone, so module loading cannot be strict.
    return deepspeed_load_checkpoint(engine, checkpoint_path, load_module_strict=False)


transformers.trainer.deepspeed_load_checkpoint = _deepspeed_load_prefix_only


class GenerationEvalCallback(TrainerCallback):
    """Generate and score the validation set every N steps, through the same code as the final evaluation."""

    def __init__(self, every: int, evaluate: Any) -> None:
        self.every, self.evaluate = every, evaluate

    def on_step_end(self, args, state, control, **kwargs):
        if self.every and state.global_step % self.every == 0 and state.global_step < state.max_steps:
            metrics = self.evaluate(f"step-{state.global_step}")
            state.log_history.append(
                {"step": state.global_step, **{f"gen_{k}": v for k, v in metrics.items()}}
            )


# ---------------------------------------------------------------- reporting


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
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def comparison_table(before: dict[str, Any] | None, after: dict[str, Any]) -> str:
    keys = [k for k in after if k != "speed"]
    if before is None:
        rows = [f"| {k} | {after[k]:.2f} |" for k in keys]
        return "\n".join(["| metric | score |", "|---|---:|", *rows])
    rows = [f"| {k} | {before[k]:.2f} | {after[k]:.2f} | {after[k] - before[k]:+.2f} |" for k in keys]
    return "\n".join(
        ["| metric | before (no prefix) | after (prefix) | change |", "|---|---:|---:|---:|", *rows]
    )


# ---------------------------------------------------------------- main


def _limit(dataset, n: int | None):
    return dataset.select(range(min(n, len(dataset)))) if n else dataset


def main(argv: list[str] | None = None) -> dict[str, Any]:
    model_args, data_args, training_args = parse_args(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    # Starts the process group now: ZeRO-3 partitions weights inside from_pretrained and needs it.
    world_size = training_args.world_size
    set_seed(training_args.seed)
    output_dir = Path(training_args.output_dir)
    is_main = training_args.process_index == 0
    logger.info("processes: %d, device: %s", world_size, training_args.device)
    # Every setting, the output directory and the checkpoint to resume are checked before anything is loaded.
    check_settings(model_args, data_args, training_args)
    plan = plan_output_dir(training_args, is_main)
    state = PartialState()
    state.wait_for_everyone()  # every process has read the output directory before it changes
    if training_args.should_save:
        plan.carry_out(output_dir)
    state.wait_for_everyone()

    if training_args.deepspeed and world_size > 1:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        # DeepSpeed's comm layer wraps the group accelerate made; ZeRO-3 init reads the world size from it.
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    tokenizer = load_tokenizer(model_args.model_name_or_path)
    model = build_model(model_args)
    trainable, total = count_parameters(model)
    print(f"trainable {trainable:,} / total {total:,} ({100 * trainable / total:.4f}%)", flush=True)

    data_config = DataConfig(**{f.name: getattr(data_args, f.name) for f in fields(DataConfig)})
    cache_dir = str(output_dir / ".data_cache")

    def tokenized(path: str, limit: int | None, for_generation: bool):
        raw = _limit(load_conversations(path, data_config, cache_dir=cache_dir), limit)
        if for_generation:
            return tokenize_for_generation(raw, tokenizer, data_config)
        dataset, stats = tokenize_for_training(raw, tokenizer, data_config)
        print(f"{path}: {stats.summary()}", flush=True)
        return dataset

    with training_args.main_process_first(desc="tokenize"):
        train_set = (
            tokenized(data_args.train_file, data_args.max_train_samples, False)
            if training_args.do_train
            else None
        )
        eval_loss_set = None
        if data_args.validation_file and training_args.eval_strategy != "no":
            eval_loss_set = tokenized(data_args.validation_file, data_args.max_eval_samples, False)
        eval_gen_set = None
        if data_args.validation_file and (training_args.do_eval or data_args.eval_generate_steps):
            eval_gen_set = tokenized(data_args.validation_file, data_args.max_eval_samples, True)
        test_set = None
        if training_args.do_predict:
            test_set = tokenized(data_args.test_file, data_args.max_predict_samples, True)

    settings = GenerationSettings(
        batch_size=training_args.per_device_eval_batch_size,
        max_new_tokens=data_args.max_new_tokens,
        do_sample=data_args.do_sample,
        top_p=data_args.top_p,
        temperature=data_args.temperature,
        num_beams=training_args.generation_num_beams or 1,
        seed=training_args.seed,
    )
    task = None if data_args.task == "none" else data_args.task

    def evaluate_generation(
        name: str, dataset, file_name: str = "generated_predictions.txt"
    ) -> dict[str, Any]:
        target = output_dir / name / file_name if name else output_dir / file_name
        metrics = evaluate_dataset(
            model, tokenizer, dataset, settings, target if is_main else None, task=task, progress=is_main
        )
        if is_main:
            print(f"[{name or 'eval'}] " + json.dumps(metrics, ensure_ascii=False), flush=True)
        return metrics

    callbacks = []
    if data_args.eval_generate_steps and eval_gen_set is not None:
        callbacks.append(
            GenerationEvalCallback(
                data_args.eval_generate_steps, lambda n: evaluate_generation(n, eval_gen_set)
            )
        )
    trainer = PrefixTrainer(
        model=model,
        args=training_args,
        train_dataset=train_set,
        eval_dataset=eval_loss_set,
        data_collator=training_collator(tokenizer),
        processing_class=tokenizer,
        callbacks=callbacks,
    )

    results: dict[str, Any] = {}
    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=plan.resume)
        trainer.save_model()
        results["train"] = train_result.metrics
        if is_main:
            curve = plot_loss_curve(trainer.state.log_history, output_dir / "loss_curve.png")
            print(f"prefix saved to {output_dir}; loss curve: {curve}", flush=True)
    if training_args.do_eval and eval_gen_set is not None:
        before = None
        if data_args.compare_with_base:
            with prefix_disabled(model):
                before = evaluate_generation("before", eval_gen_set)
        after = evaluate_generation("", eval_gen_set)
        results["eval"] = {"before": before, "after": after}
        if is_main:
            table = comparison_table(before, after)
            print(
                f"\nvalidation ({len(eval_gen_set)} examples, {data_args.validation_file}):\n{table}\n",
                flush=True,
            )
            (output_dir / "eval_table.md").write_text(table + "\n")
    if test_set is not None:
        results["predict"] = evaluate_generation("predict", test_set)
    if is_main:
        (output_dir / "all_results.json").write_text(
            json.dumps(results, indent=2, ensure_ascii=False, default=str)
        )
    return results


def cli(argv: list[str] | None = None) -> int:
    """One ``error:`` line per problem and exit 1, instead of a traceback, for what a user can fix."""
    try:
        main(argv)
    except (TrainingStopped, ValueError, OSError) as err:  # OSError: missing files, Hub/loading errors
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    # Run the importable module, not __main__, so the arguments saved in checkpoints unpickle by name.
    from ptuning_v2.train import cli as _cli

    sys.exit(_cli())
