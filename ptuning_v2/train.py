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

import argparse
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
from dataclasses import MISSING, asdict, dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any

import datasets as hf_datasets
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

from . import nlu
from .checkpoint import (
    PREFIX_METHODS,
    CheckpointError,
    checkpoint_method,
    load_prefix_checkpoint,
    prefix_method_name,
    read_tuning_checkpoint,
)
from .data import (
    DataConfig,
    load_conversations,
    tokenize_for_generation,
    tokenize_for_training,
    training_collator,
)
from .evaluate import BOOLEAN_WORDS, parse_bool
from .files import atomic_write_text, swap_directory
from .generation import GenerationSettings, evaluate_dataset
from .loading import check_model_path, load_model, load_tokenizer, quantization_config, resolve_dtype
from .methods import METHODS, attach_method, count_parameters, method_config, method_settings, tuning_of
from .metrics import TASKS

logger = logging.getLogger("ptuning_v2.train")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="models/glm-zh-tiny", metadata={"help": "backbone directory"})
    ptuning_checkpoint: str | None = field(
        default=None, metadata={"help": "a checkpoint of the same method to start from (warm start)"}
    )
    method: str = field(default="ptuning_v2", metadata={"help": "one of " + ", ".join(METHODS)})
    quantization_bit: str | None = field(default=None, metadata={"help": "4 (nf4), 8, or none"})
    torch_dtype: str | None = field(default=None, metadata={"help": "fp32, bf16, fp16; default fp32 on CPU"})


# Every method's config fields (PrefixConfig, PTuningV1Config, ...), as flags: --pre_seq_len, --lora_rank, ...
MethodArguments = make_dataclass(
    "MethodArguments",
    [(name, hint, field(default=default)) for name, (hint, default) in method_settings().items()],
)


@dataclass
class DataArguments(DataConfig):
    """The data settings of ``DataConfig`` (columns, lengths, source prefix) plus the run's data options."""

    train_file: str | None = field(
        default=None,
        metadata={
            "help": "training data; a comma-separated list trains on their mix (multi-task, shuffled by seed)"
        },
    )
    validation_file: str | None = None
    test_file: str | None = None
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    max_predict_samples: int | None = None
    task: str = field(default="auto", metadata={"help": "ner, sentiment, none or auto (from the labels)"})
    eval_generate_steps: int = field(
        default=0, metadata={"help": "also generate+score every N steps (0: off)"}
    )
    compare_with_base: bool = field(default=False, metadata={"help": "score the backbone without prefix too"})
    task_type: str = field(
        default="generation",
        metadata={
            "help": "generation (chat answers, scored on generated text), seq_cls (a sequence-classification head "
            'on {"text", "label"} rows, accuracy) or token_cls (a token-classification head on {"tokens", "tags"} '
            "rows, BIO span F1)"
        },
    )

    def train_files(self) -> list[str]:
        """``--train_file`` as a list: several files (comma-separated) train one prefix on their mix."""
        return [p.strip() for p in (self.train_file or "").split(",") if p.strip()]


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
        metadata={"help": "stop when a trained weight grows past this magnitude (saturated prefix); 0: off"},
    )
    zero_grad_patience: int = field(
        default=10,
        metadata={
            "help": "stop after this many optimizer steps in a row whose gradient is exactly 0; 0: off "
            "(a non-finite gradient stops at once)"
        },
    )


@dataclass
class RunSettings:
    """Everything a training run was told, parsed and typed: what ``main`` works from."""

    model: ModelArguments
    method: Any  # MethodArguments
    data: DataArguments
    generation: GenerationSettings
    training: PrefixTrainingArguments

    def method_config(self) -> Any:
        return method_config(self.model.method, asdict(self.method))


_ARGUMENT_CLASSES = (
    ModelArguments,
    MethodArguments,
    DataArguments,
    GenerationSettings,
    PrefixTrainingArguments,
)


class _ArgumentParser(HfArgumentParser):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        for action in self._actions:  # every boolean flag takes the spellings of parse_bool
            if action.type is string_to_bool:
                action.type = parse_bool

    def error(self, message: str):  # argparse would print a usage of some 200 flags before the one line
        self.exit(2, f"error: {message} (--help lists the flags)\n")


def _config_defaults(parser: _ArgumentParser, path: str) -> dict[str, Any]:
    """A YAML/JSON settings file as parser defaults, each value converted (and checked) by its flag's type."""
    file = Path(path)
    if not file.is_file():
        raise SettingsError(f"--config {path!r}: no such settings file")
    try:
        settings = yaml.safe_load(file.read_text(encoding="utf-8"))  # YAML reads JSON too
    except (yaml.YAMLError, UnicodeDecodeError) as err:
        raise SettingsError(f"{path}: not valid YAML/JSON ({str(err).splitlines()[0]})") from err
    if not isinstance(settings, dict):
        raise SettingsError(f"{path}: expected a mapping of setting names to values")
    actions = {a.dest: a for a in parser._actions}
    defaults: dict[str, Any] = {}
    for key, value in settings.items():
        action = actions.get(key)
        if action is None or key in ("help", "config"):
            raise SettingsError(f"{path}: unknown setting {key!r} (--help lists them)")
        if value is not None and action.type is not None and not isinstance(value, (list, dict)):
            try:
                value = action.type(str(value) if not isinstance(value, bool) else value)
            except (TypeError, ValueError, argparse.ArgumentTypeError) as err:
                raise SettingsError(f"{path}: {key}: {value!r} is not valid ({err})") from None
        if action.choices is not None and value not in action.choices:
            raise SettingsError(f"{path}: {key}: {value!r} is not one of {list(action.choices)}")
        defaults[key] = value
    return defaults


def _given_flags(argv: list[str]) -> set[str]:
    return {arg[2:].split("=", 1)[0] for arg in argv if arg.startswith("--")}


def parse_args(argv: list[str] | None = None) -> RunSettings:
    """Flags, a settings file (``--config FILE``, flags override it), or a settings file alone."""
    parser = _ArgumentParser(_ARGUMENT_CLASSES)
    parser.add_argument(
        "--config", default=None, help="a YAML/JSON file of settings; flags given beside it win"
    )
    argv = list(sys.argv[1:] if argv is None else argv)
    if len(argv) == 1 and argv[0].endswith((".json", ".yaml", ".yml")):
        argv = ["--config", argv[0]]
    config_path = None
    for i, arg in enumerate(argv):
        if arg == "--config" and i + 1 < len(argv):
            config_path = argv[i + 1]
        elif arg.startswith("--config="):
            config_path = arg.split("=", 1)[1]
    defaults = _config_defaults(parser, config_path) if config_path else {}
    given = _given_flags(argv)
    if "method" in given and "learning_rate" not in given and "learning_rate" in defaults:
        # A settings file's learning rate belongs to its method: a prefix's 1e-1 would wreck LoRA or full.
        method = next(argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--method")
        if method != defaults.get("method", ModelArguments.method) and method in METHODS:
            defaults["learning_rate"] = DEFAULT_LEARNING_RATES[method]
            print(
                f"note: --method {method} with the learning rate of {config_path} ({defaults.get('method')}) "
                f"replaced by {method}'s default {DEFAULT_LEARNING_RATES[method]:g}; give --learning_rate "
                "(LR=) to choose",
                flush=True,
            )
    parser.set_defaults(**defaults)
    # Without CUDA, accelerate sees a torchrun/DeepSpeed job as one process unless told it runs on CPU.
    if not torch.cuda.is_available() and "use_cpu" not in given:
        argv += ["--use_cpu", "true"]
    derive_output_dir = "output_dir" not in given and defaults.get("output_dir") is None
    if derive_output_dir:  # named once the settings are known (below)
        argv += ["--output_dir", "output/run"]
    parsed = parser.parse_args_into_dataclasses(args=argv)
    model_args, method_args, data_args, generation, training = parsed[:5]
    if derive_output_dir:
        training.output_dir = default_output_dir(model_args, method_args, data_args, training)
    return RunSettings(model_args, method_args, data_args, generation, training)


# Starting points for each method's learning rate on the bundled tasks (the comparison tunes them on dev).
DEFAULT_LEARNING_RATES = {
    "ptuning_v2": 1e-1,
    "prefix_tuning": 1e-2,
    "ptuning_v1": 1e-2,
    "prompt_tuning": 1e-1,
    "lora": 1e-3,
    "full": 1e-4,
}


def _short_number(value: float) -> str:
    """0.1 -> 1e-1, 0.02 -> 2e-2: how the recipes write learning rates in directory names."""
    mantissa, exponent = f"{value:e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def default_output_dir(
    model_args: ModelArguments, method_args: Any, data_args: DataArguments, args: Any
) -> str:
    """``output/<data dir>-<method>[-<pre_seq_len>]-<learning rate>``, e.g. output/ner-ptuning_v2-64-1e-1
    (``mix-...`` for several training files; ``nlu-sentiment_train-...`` for an NLU head: the NLU files share a
    directory)."""
    files = data_args.train_files()
    file = Path(files[0] if files else data_args.validation_file or "run")
    data = "mix" if len(files) > 1 else file.parent.name or "run"
    if data_args.task_type != "generation" and len(files) <= 1:
        data = f"{data}-{file.stem}"
    length = "" if model_args.method in ("lora", "full") else f"-{method_args.pre_seq_len}"
    return f"output/{data}-{model_args.method}{length}-{_short_number(args.learning_rate)}"


def build_model(settings: RunSettings, **model_kwargs: Any) -> torch.nn.Module:
    """The backbone with the method attached: fresh, or warm-started from ``--ptuning_checkpoint``.

    ``model_kwargs`` go to ``load_model`` (an NLU head: ``model_class``, ``num_labels``, ...)."""
    model_args = settings.model
    if model_args.ptuning_checkpoint:
        found = checkpoint_method(model_args.ptuning_checkpoint)
        if found != model_args.method:
            raise SettingsError(
                f"--ptuning_checkpoint {model_args.ptuning_checkpoint} is a {found} checkpoint, but --method is "
                f"{model_args.method}; warm-start a method from its own checkpoints"
            )
        model = load_model(
            model_args.model_name_or_path,
            model_args.ptuning_checkpoint,
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
        attach_method(model, model_args.method, settings.method_config())
    model.train()
    return model


# ---------------------------------------------------------------- checks before anything is loaded or written


class SettingsError(ValueError):
    """Settings that cannot work, found before anything is loaded; one line per problem, each naming the flag."""


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


def settings_problems(settings: RunSettings) -> list[str]:
    """Everything wrong with the settings, each as ``--flag value: what is wrong``; empty when all is well."""
    model_args, method_args, data_args, generation, args = (
        settings.model,
        settings.method,
        settings.data,
        settings.generation,
        settings.training,
    )
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
    count("pre_seq_len", method_args.pre_seq_len, "virtual tokens")
    count("prefix_hidden_size", method_args.prefix_hidden_size, "units", optional=True)
    count("prompt_encoder_hidden_size", method_args.prompt_encoder_hidden_size, "units", optional=True)
    count("lora_rank", method_args.lora_rank, "ranks")
    if model_args.method in METHODS:
        try:  # each method's config checks its own fields (choices, ranges)
            settings.method_config()
        except (TypeError, ValueError) as err:
            name = str(err).split(" ", 1)[0]  # the configs' messages start with the field's name
            if not hasattr(method_args, name):
                problems.append(f"--method {model_args.method}: {err}")
            elif not any(p.startswith(f"--{name} ") for p in problems):
                problems.append(f"--{name} {_shown(getattr(method_args, name))}: {err}")
        quantized = model_args.quantization_bit not in (None, "", "none", "None", "16", "32")
        if quantized and not METHODS[model_args.method].quantized_backbone_ok:
            problems.append(
                f"--method {model_args.method} with --quantization_bit {model_args.quantization_bit}: full "
                "fine-tuning cannot train a 4/8-bit backbone (bitsandbytes weights take no optimizer step); use "
                "--quantization_bit none, or a parameter-efficient method (ptuning_v2, lora, ...)"
            )
    for check, flag, value in (
        (lambda v: quantization_config(v, torch.float32), "quantization_bit", model_args.quantization_bit),
        (resolve_dtype, "torch_dtype", model_args.torch_dtype),
    ):
        try:
            check(value)
        except ValueError as err:
            problems.append(f"--{flag} {_shown(value)}: {err}")

    for path in data_args.train_files() or [None]:
        data_file("train_file", path, "--do_train needs" if args.do_train else None)
    problems += _task_type_problems(settings)
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
    count("max_new_tokens", generation.max_new_tokens, "tokens")
    count("num_beams", generation.num_beams, "beams")
    need(data_args.task in TASKS, "task", data_args.task, f"must be one of {', '.join(TASKS)}")
    need(0 < generation.top_p <= 1, "top_p", generation.top_p, "must be in (0, 1]")
    need(generation.temperature > 0, "temperature", generation.temperature, "must be above 0")
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


def _task_type_problems(settings: RunSettings) -> list[str]:
    """What ``--task_type`` rules out: an unknown type; for an NLU head, a mix of training files (multi-task
    training is for the generative format) and evaluation without training and without a checkpoint (whose
    ``labels.json`` says what the head's outputs mean)."""
    data, args, task_type = settings.data, settings.training, settings.data.task_type
    if task_type not in nlu.TASK_TYPES:
        return [f"--task_type {task_type!r}: must be one of {', '.join(nlu.TASK_TYPES)}"]
    if task_type == "generation":
        return []
    problems = []
    if len(data.train_files()) > 1:
        problems.append(
            f"--train_file {data.train_file!r}: several training files train one generative prefix on their mix; "
            f"--task_type {task_type} takes one file"
        )
    if not args.do_train and (args.do_eval or args.do_predict) and not settings.model.ptuning_checkpoint:
        problems.append(
            f"--task_type {task_type} without --do_train needs --ptuning_checkpoint: a trained head, whose "
            f"{nlu.LABELS_FILE} says what its outputs mean"
        )
    return problems


def check_settings(settings: RunSettings) -> None:
    problems = settings_problems(settings)
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


def _trained(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """What the method trains (looking through DDP/DeepSpeed wrappers)."""
    return tuning_of(model).trainable_parameters()


def _trained_name(model: torch.nn.Module) -> str:
    """How the health messages name what trains, for every method (a prefix, LoRA, the whole model)."""
    return f"the trained weights ({tuning_of(model).name})"


class TrainingHealthCallback(TrainerCallback):
    """Stop a run whose prefix has blown up or no longer learns, naming the step; nothing of it is saved.

    * A prefix weight larger than ``--max_prefix_weight`` (1e4) in magnitude after an optimizer step: the prefix
      has saturated, attention to it is all-or-nothing and its gradient is ~0, so the run cannot recover. In the
      bundled main job (lr 0.1, 700 steps) no prefix weight passes 10 and the gradient norm stays within
      0.034-0.22 at every step; Adam moves each weight by about the learning rate a step, so an absurd learning
      rate (1e4 and up) passes the bound at its first step.
    * A prefix gradient that is exactly 0 for ``--zero_grad_patience`` (10) optimizer steps in a row: the loss no
      longer depends on the prefix. (A non-finite loss or gradient stops at once: ``TuningTrainer.training_step``.)

    Checked on every process alike: gradients are equal across data-parallel processes, and the largest weight
    is reduced across them (ZeRO-3 gives each only a partition). Under DeepSpeed the gradient check is skipped
    (it keeps gradients in its own buffers).
    """

    def __init__(self) -> None:
        self.zero_since: int | None = None

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if model is None:
            return
        grads = [p.grad for p in _trained(model) if p.grad is not None]
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
                f"the gradient of {_trained_name(model)} has been exactly 0 since step {self.zero_since} "
                f"({args.zero_grad_patience} optimizer steps in a row, up to step {step}; --zero_grad_patience): "
                "the loss no longer depends on them (most likely saturated)",
                args,
            )

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if model is None or not args.max_prefix_weight:
            return
        values = [getattr(p, "ds_tensor", p).detach() for p in _trained(model)]
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
                f"{_trained_name(model)} are no longer finite ({largest}) after step {state.global_step}",
                args,
            )
        if largest > args.max_prefix_weight:
            raise _stopped(
                SaturatedError,
                f"{_trained_name(model)} saturated at step {state.global_step}: a weight of magnitude "
                f"{largest:.3g}, past --max_prefix_weight {args.max_prefix_weight:g} (normal runs stay far below "
                "it), leaves attention all-or-nothing and the gradient ~0",
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


class TuningTrainer(Trainer):
    """The HF Trainer, hooked where it must be: it saves what the method trains (``model.tuning``), writes
    checkpoints atomically, and stops on a non-finite loss or trained weights gone bad."""

    def __init__(self, model: torch.nn.Module, **kwargs: Any) -> None:
        # The health checks come first, so that no other callback acts on a step that broke the prefix.
        kwargs["callbacks"] = [TrainingHealthCallback(), *(kwargs.get("callbacks") or [])]
        # The Trainer refuses a quantized model without a PEFT adapter; the method's parameters are our adapter.
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
        if not all(torch.isfinite(p.detach()).all() for p in _trained(model)):
            self._stop("the trained weights are no longer finite (inf/nan)")

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        self._check_finite_prefix()
        output_dir = output_dir or self.args.output_dir
        handle = tuning_of(self.accelerator.unwrap_model(self.model))
        if handle.saves_backbone:  # the whole model: the Trainer's own save gathers ZeRO-3 shards
            super().save_model(output_dir, _internal_call)
            if self.args.should_save:
                handle.write_config(output_dir)
            return
        with _gathered(handle.trainable_parameters(), self.is_deepspeed_enabled):
            if self.args.should_save:
                handle.save(output_dir)
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
            swap_directory(os.path.join(staging_root, f"checkpoint-{self.state.global_step}"), final)
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
        handle = tuning_of(self.accelerator.unwrap_model(model or self.model))
        if handle.saves_backbone:
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        loaded = _read_checkpoint_state(resume_from_checkpoint, handle.name)
        handle.load_state_dict(loaded, resume_from_checkpoint)

    def training_step(self, model, inputs, num_items_in_batch=None):
        loss = super().training_step(model, inputs, num_items_in_batch)
        # The gradient is checked here, before clipping can hide an inf (it scales everything by max_norm/inf = 0).
        # Under fp16 an inf gradient is the loss scaler's to skip; DeepSpeed keeps gradients in its own buffers.
        # The norm is the one clipping computes: past float32's range it is inf even where every element is finite.
        grads = [p.grad.detach() for p in _trained(model) if p.grad is not None]
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


def _read_checkpoint_state(path: str, method: str) -> dict[str, torch.Tensor]:
    """The tensors a ``checkpoint-N`` folder holds for ``method``, checked against the method's checkpoint format."""
    if method in PREFIX_METHODS:
        checkpoint = load_prefix_checkpoint(path)
        if prefix_method_name(checkpoint.config) != method:
            raise CheckpointError(
                f"{path}: a {prefix_method_name(checkpoint.config)} checkpoint, not {method}"
            )
        return checkpoint.state_dict
    checkpoint = read_tuning_checkpoint(path)
    if checkpoint.method != method:
        raise CheckpointError(f"{path}: a {checkpoint.method} checkpoint, this run trains {method}")
    return checkpoint.state_dict


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


def comparison_table(before: dict[str, Any] | None, after: dict[str, Any], method: str = "prefix") -> str:
    keys = [k for k in after if k != "speed"]
    if before is None:
        rows = [f"| {k} | {after[k]:.2f} |" for k in keys]
        return "\n".join(["| metric | score |", "|---|---:|", *rows])
    rows = [f"| {k} | {before[k]:.2f} | {after[k]:.2f} | {after[k] - before[k]:+.2f} |" for k in keys]
    return "\n".join(
        [f"| metric | before (backbone alone) | after ({method}) | change |", "|---|---:|---:|---:|", *rows]
    )


# ---------------------------------------------------------------- main


def _limit(dataset, n: int | None):
    return dataset.select(range(min(n, len(dataset)))) if n else dataset


def start_run(settings: RunSettings) -> OutputPlan:
    """Check every setting, the output directory and the checkpoint to resume, before anything is loaded; then
    move an earlier run aside where told to, and record the settings in the output directory."""
    args = settings.training
    check_settings(settings)
    plan = plan_output_dir(args, args.process_index == 0)
    state = PartialState()
    state.wait_for_everyone()  # every process has read the output directory before it changes
    if args.should_save:
        plan.carry_out(Path(args.output_dir))
        if args.do_train:
            write_run_config(settings, Path(args.output_dir) / RUN_CONFIG)
    state.wait_for_everyone()
    if args.deepspeed and args.world_size > 1:
        import deepspeed
        from deepspeed.accelerator import get_accelerator

        # DeepSpeed's comm layer wraps the group accelerate made; ZeRO-3 init reads the world size from it.
        deepspeed.init_distributed(dist_backend=get_accelerator().communication_backend_name())
    return plan


RUN_CONFIG = "run_config.yaml"


def _plain_yaml(value: Any) -> bool:
    """A value a settings file can hold and the parser read back (no config objects)."""
    if isinstance(value, (list, tuple)):
        return all(_plain_yaml(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def write_run_config(settings: RunSettings, path: Path) -> None:
    """The run's settings as a ``--config`` file: ``python -m ptuning_v2.train --config <it>`` repeats the run."""
    values: dict[str, Any] = {}
    for part in (settings.model, settings.data, settings.generation):
        values.update(asdict(part))
    values.update({k: v for k, v in asdict(settings.method).items() if k in asdict(settings.method_config())})
    # The training arguments that differ from their declared defaults (the rest would only bury them). Compared
    # with the field defaults, not a fresh TrainingArguments: building one sets up devices and, under torchrun,
    # the process group again.
    args = settings.training
    for f in fields(PrefixTrainingArguments):
        if not f.init or f.name.startswith("_"):
            continue
        value = getattr(args, f.name, None)
        value = getattr(value, "value", value)  # enums as their flag spelling
        default = f.default if f.default is not MISSING else None
        if value != getattr(default, "value", default) and _plain_yaml(value):
            values[f.name] = value
    values["output_dir"] = args.output_dir
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(values, allow_unicode=True, sort_keys=False))


@dataclass
class Datasets:
    train: Any = None
    eval_loss: Any = None  # tokenized for the loss (--eval_strategy)
    eval_generate: Any = None  # prompts only, for generate + score
    test: Any = None


def _conversations(paths: list[str], config: DataConfig, cache_dir: str, seed: int):
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
        raw = _limit(_conversations(paths, data_config, cache_dir, args.seed), limit)
        if for_generation:
            return tokenize_for_generation(raw, tokenizer, data_config)
        dataset, stats = tokenize_for_training(raw, tokenizer, data_config)
        print(f"{','.join(paths)}: {stats.summary()}", flush=True)
        return dataset

    found = Datasets()
    with args.main_process_first(desc="tokenize"):
        if args.do_train:
            found.train = tokenized(data_args.train_files(), data_args.max_train_samples, False)
        if data_args.validation_file and args.eval_strategy != "no":
            found.eval_loss = tokenized([data_args.validation_file], data_args.max_eval_samples, False)
        if data_args.validation_file and (args.do_eval or data_args.eval_generate_steps):
            found.eval_generate = tokenized([data_args.validation_file], data_args.max_eval_samples, True)
        if args.do_predict:
            found.test = tokenized([data_args.test_file], data_args.max_predict_samples, True)
    return found


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


def nlu_scorer(settings: RunSettings, model: torch.nn.Module, tokenizer: Any, labels: list[Any]):
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


class LabelsCallback(TrainerCallback):
    """Every checkpoint gets the head's ``labels.json``, so it loads and predicts on its own."""

    def __init__(self, task_type: str, labels: list[Any]) -> None:
        self.task_type, self.labels = task_type, labels

    def on_save(self, args, state, control, **kwargs):
        checkpoint = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if args.should_save and checkpoint.is_dir():
            nlu.write_labels(checkpoint, self.task_type, self.labels)


def generation_scorer(settings: RunSettings, model: torch.nn.Module, tokenizer: Any):
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


def make_trainer(
    settings: RunSettings, model, tokenizer, datasets: Datasets, score, labels: list[Any] | None = None
) -> TuningTrainer:
    callbacks: list[TrainerCallback] = []
    every = settings.data.eval_generate_steps
    if every and datasets.eval_generate is not None:
        callbacks.append(GenerationEvalCallback(every, lambda name: score(name, datasets.eval_generate)))
    head = labels is not None  # an NLU head: its own collator and loss (see ptuning_v2.nlu)
    if head:
        callbacks.append(LabelsCallback(settings.data.task_type, labels))
    return TuningTrainer(
        model=model,
        args=settings.training,
        train_dataset=datasets.train,
        eval_dataset=datasets.eval_loss,
        data_collator=nlu.collator(tokenizer.pad_token_id) if head else training_collator(tokenizer),
        compute_loss_func=nlu.loss if head else None,
        processing_class=tokenizer,
        callbacks=callbacks,
    )


def train(trainer: TuningTrainer, plan: OutputPlan) -> dict[str, Any]:
    result = trainer.train(resume_from_checkpoint=plan.resume)
    trainer.save_model()
    output_dir = Path(trainer.args.output_dir)
    if trainer.args.process_index == 0:
        curve = plot_loss_curve(trainer.state.log_history, output_dir / "loss_curve.png")
        print(
            f"{tuning_of(trainer.model).name} checkpoint saved to {output_dir}; loss curve: {curve}",
            flush=True,
        )
    return result.metrics


def evaluate_before_after(
    settings: RunSettings, model, datasets: Datasets, score, before=None
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
    evaluating = args.do_eval and datasets.eval_generate is not None
    before = None
    if evaluating and settings.data.compare_with_base and tuning_of(model).saves_backbone:
        before = score(
            "before", datasets.eval_generate
        )  # full fine-tuning leaves no bare backbone afterwards
    if args.do_train:
        results["train"] = train(trainer, plan)
    if evaluating:
        results["eval"] = evaluate_before_after(settings, model, datasets, score, before)
    if datasets.test is not None:
        results["predict"] = score("predict", datasets.test)
    if args.process_index == 0:
        atomic_write_text(
            Path(args.output_dir) / "all_results.json",
            json.dumps(results, indent=2, ensure_ascii=False, default=str),
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
