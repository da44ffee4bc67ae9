"""What a training run is told: the flags (or a settings file), parsed into ``RunSettings``; every setting
checked before anything is loaded or written (``check_settings``); the default output directory's name; and
``run_config.yaml``, the settings file that repeats the run."""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import MISSING, asdict, dataclass, field, fields, make_dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import HfArgumentParser, Seq2SeqTrainingArguments
from transformers.hf_argparser import string_to_bool

from .. import mixing, nlu, retention
from ..data import DataConfig
from ..files import atomic_write_text
from ..generation import GenerationSettings
from ..loading import check_model_path, quantization_config, resolve_dtype
from ..methods import METHODS, method_class, method_config, method_settings
from ..methods.catalog import DEFAULT_METHOD
from ..metrics import TASKS
from ..spellings import parse_bool, parse_quantization


@dataclass
class ModelArguments:
    model_name_or_path: str = field(default="models/glm-zh-tiny", metadata={"help": "backbone directory"})
    ptuning_checkpoint: str | None = field(
        default=None, metadata={"help": "a checkpoint of the same method to start from (warm start)"}
    )
    method: str = field(default=DEFAULT_METHOD, metadata={"help": "one of " + ", ".join(METHODS)})
    quantization_bit: str | None = field(default=None, metadata={"help": "4 (nf4), 8, or none"})
    torch_dtype: str | None = field(
        default=None,
        metadata={
            "help": "fp32, bf16, fp16; default fp32 on CPU (bf16 for a 4/8-bit backbone on a CPU with AVX512-BF16/AMX)"
        },
    )


# Every method's config fields (PrefixConfig, PTuningV1Config, ...), as flags: --pre_seq_len, --lora_rank, ...
MethodArguments = make_dataclass(
    "MethodArguments",
    [(name, hint, field(default=default)) for name, (hint, default) in method_settings().items()],
)


@dataclass
class DataArguments(DataConfig, retention.RetentionSettings):
    """The data settings of ``DataConfig`` (columns, lengths, source prefix), the general set of the retention
    score (``RetentionSettings``), plus the run's data options."""

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

    mix_file: str | None = field(
        default=None,
        metadata={
            "help": "general data interleaved into every batch (comma-separated files, the task's format); "
            f"default for the embedded backbone: {mixing.BUNDLED_MIX}"
        },
    )
    mix_ratio: float = field(
        default=0.0, metadata={"help": "the share of every training batch taken from --mix_file, in [0, 1)"}
    )

    def train_files(self) -> list[str]:
        """``--train_file`` as a list: several files (comma-separated) train one prefix on their mix."""
        return _paths(self.train_file)

    def mix_files(self) -> list[str]:
        """``--mix_file`` as a list (comma-separated)."""
        return _paths(self.mix_file)


def _paths(value: str | None) -> list[str]:
    return [p.strip() for p in (value or "").split(",") if p.strip()]


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
            defaults["learning_rate"] = METHODS[method].learning_rate
            print(
                f"note: --method {method} with the learning rate of {config_path} ({defaults.get('method')}) "
                f"replaced by {method}'s default {METHODS[method].learning_rate:g}; give --learning_rate "
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
    if data_args.mix_ratio and not data_args.mix_file and _is_embedded(model_args.model_name_or_path):
        # The embedded backbone's own chat kinds are its general data (recorded in run_config.yaml as the mix).
        data_args.mix_file = mixing.BUNDLED_MIX
    return RunSettings(model_args, method_args, data_args, generation, training)


def _is_embedded(model: str) -> bool:
    """The backbone is the embedded one (the default ``--model_name_or_path``), wherever it is named from."""
    return Path(model).resolve() == Path(ModelArguments.model_name_or_path).resolve()


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
    spec = METHODS.get(model_args.method)
    length = f"-{method_args.pre_seq_len}" if spec is None or spec.prompt_length else ""
    return f"output/{data}-{model_args.method}{length}-{_short_number(args.learning_rate)}"


# ---------------------------------------------------------------- checks before anything is loaded or written


class SettingsError(ValueError):
    """Settings that cannot work, found before anything is loaded; one line per problem, each naming the flag."""


def _shown(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return repr(value) if isinstance(value, str) else str(value)


# Method settings that count something, with what they count; each is checked for the method that has it.
COUNTED_SETTINGS = (
    ("pre_seq_len", "virtual tokens", False),
    ("prefix_hidden_size", "units", True),
    ("prompt_encoder_hidden_size", "units", True),
    ("lora_rank", "ranks", False),
)


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
    if model_args.method in METHODS:
        # Only the chosen method's settings are its (the others' flags keep their defaults, unread).
        own = {f.name for f in fields(method_class(model_args.method).config_class)}
        for flag, what, optional in COUNTED_SETTINGS:
            if flag in own:
                count(flag, getattr(method_args, flag), what, optional)
        try:  # each method's config checks its own fields (choices, ranges)
            settings.method_config()
        except (TypeError, ValueError) as err:
            name = str(err).split(" ", 1)[0]  # the configs' messages start with the field's name
            if not hasattr(method_args, name):
                problems.append(f"--method {model_args.method}: {err}")
            elif not any(p.startswith(f"--{name} ") for p in problems):
                problems.append(f"--{name} {_shown(getattr(method_args, name))}: {err}")
        try:
            bits = parse_quantization(model_args.quantization_bit)
        except ValueError:
            bits = None  # named below
        if bits not in METHODS[model_args.method].quantizations:
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
    if data_args.task_type == "generation":  # an NLU head skips retention (start_head says so)
        problems += retention.settings_problems(data_args)
    held_out = [
        (flag, path)
        for flag, path in (("validation_file", data_args.validation_file), ("test_file", data_args.test_file))
        if path and Path(path).is_file()
    ]
    if args.do_train or data_args.mix_file:
        problems += mixing.settings_problems(
            data_args.mix_files(),
            data_args.mix_ratio,
            [p for p in data_args.train_files() if Path(p).is_file()],
            held_out,
            DataConfig(**{f.name: getattr(data_args, f.name) for f in fields(DataConfig)}),
            data_args.task_type,
        )
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
