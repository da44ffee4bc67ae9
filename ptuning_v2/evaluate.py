"""Generate answers for a test file with a tuned model and write the official ``generated_predictions.txt``.

    python -m ptuning_v2.evaluate --model models/glm-zh-tiny --checkpoint output/ner --test_file data/ner/dev.json \\
        --output_dir output/ner/eval

The generation flags are ``GenerationSettings``' and the data flags ``DataConfig``'s, as in training; a checkpoint
written by ``ptuning_v2.train`` brings its run's data settings (``run_config.yaml``: columns, source length), so
prompts are cut as in training unless a flag says otherwise. Scores come from ``evaluate/rouge.py`` on the file
this writes (``scripts/evaluate.sh`` runs both); the package's own scores go to ``metrics.json``.

``--retention`` (``RETENTION=true``) also scores the general set of ``ptuning_v2.retention`` (and ``--retention_file``,
a general file of your own), for any backbone: with the checkpoint's method on and for the bare backbone, into
``retention.json`` and a before/after table (``retention_table.md``); without a checkpoint, the backbone's scores.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from .spellings import parse_bool


@dataclass
class EvaluateArguments:
    model: str = field(metadata={"help": "backbone directory (native or original ChatGLM2/3)"})
    test_file: str = field(metadata={"help": "data file to answer (json/jsonl)"})
    output_dir: str = field(metadata={"help": "where generated_predictions.txt goes"})
    checkpoint: str | None = field(
        default=None, metadata={"help": "any method's checkpoint (prefixes also official/PEFT); none = bare"}
    )
    batch_size: int = 16
    max_samples: int | None = None
    quantization_bit: str | None = None
    torch_dtype: str | None = None
    seed: int = field(default=42, metadata={"help": "makes sampled answers reproducible"})
    task: str = field(
        default="auto", metadata={"help": "ner, sentiment, none or auto: the metrics.json scores"}
    )


def run_config_of(checkpoint: str | None) -> dict[str, Any]:
    """The settings a training run recorded beside its checkpoint (``run_config.yaml``), or {}."""
    if not checkpoint:
        return {}
    for folder in (Path(checkpoint), Path(checkpoint).parent):
        path = folder / "run_config.yaml"
        if path.is_file():
            try:
                values = yaml.safe_load(path.read_text(encoding="utf-8"))
            except (yaml.YAMLError, UnicodeDecodeError):
                return {}  # a damaged record only loses its defaults
            return values if isinstance(values, dict) else {}
    return {}


def parse_args(argv: list[str] | None = None) -> tuple[EvaluateArguments, Any, Any, Any]:
    from transformers import HfArgumentParser

    from .data import DataConfig
    from .generation import GenerationSettings
    from .retention import RetentionSettings

    parser = HfArgumentParser((EvaluateArguments, GenerationSettings, DataConfig, RetentionSettings))
    for action in parser._actions:  # every boolean flag takes the spellings of parse_bool
        if action.type is not None and getattr(action.type, "__name__", "") == "string_to_bool":
            action.type = parse_bool
    argv = list(sys.argv[1:] if argv is None else argv)
    first, _ = parser.parse_known_args(argv)
    recorded = run_config_of(first.checkpoint)
    data_fields = {f.name for f in fields(DataConfig)} - {"max_target_length"}
    parser.set_defaults(**{k: v for k, v in recorded.items() if k in data_fields})
    args, generation, data, retention = parser.parse_args_into_dataclasses(args=argv)
    problems = settings_problems(args, generation, data, retention)
    if problems:
        parser.exit(2, "".join(f"error: {problem}\n" for problem in problems))
    return args, generation, data, retention


def settings_problems(
    args: EvaluateArguments, generation: Any, data: Any, retention: Any = None
) -> list[str]:
    """Everything wrong with the settings, found before anything is loaded, each naming its flag and value."""
    from . import retention as general_set
    from .loading import check_model_path, quantization_config, resolve_dtype
    from .metrics import TASKS

    problems = general_set.settings_problems(retention) if retention is not None else []
    values = {
        "batch_size": args.batch_size,
        "max_samples": args.max_samples,
        "max_new_tokens": generation.max_new_tokens,
        "num_beams": generation.num_beams,
        "max_source_length": data.max_source_length,
    }
    for flag, value in values.items():
        if flag == "max_samples" and value is None:
            continue
        if value < 1:
            problems.append(f"--{flag} {value}: must be a positive number")
    if not 0 < generation.top_p <= 1:
        problems.append(f"--top_p {generation.top_p}: must be in (0, 1]")
    if generation.temperature <= 0:
        problems.append(f"--temperature {generation.temperature}: must be above 0")
    if args.task not in TASKS:
        problems.append(f"--task {args.task!r}: must be one of {', '.join(TASKS)}")
    if Path(args.test_file).is_dir():
        problems.append(f"--test_file {args.test_file!r} is a directory, not a data file")
    elif not Path(args.test_file).is_file():
        problems.append(f"--test_file {args.test_file!r} does not exist")
    if args.checkpoint and not Path(args.checkpoint).exists():
        problems.append(f"--checkpoint {args.checkpoint!r} does not exist")
    if Path(args.output_dir).exists() and not Path(args.output_dir).is_dir():
        problems.append(f"--output_dir {args.output_dir!r} is a file, not a directory")
    checks = (
        (check_model_path, "model", args.model),
        (lambda v: quantization_config(v, resolve_dtype(None)), "quantization_bit", args.quantization_bit),
        (resolve_dtype, "torch_dtype", args.torch_dtype),
    )
    for check, flag, value in checks:
        try:
            check(value)
        except (ValueError, FileNotFoundError) as err:
            problems.append(f"--{flag}: {err}")
    return problems


def main(argv: list[str] | None = None) -> Path:
    from .data import load_conversations, tokenize_for_generation
    from .files import atomic_write_text
    from .generation import evaluate_dataset
    from .loading import load_model, load_tokenizer

    args, generation, data, retention = parse_args(argv)
    output_dir = Path(args.output_dir)
    tokenizer = load_tokenizer(args.model)
    raw = load_conversations(args.test_file, data, cache_dir=str(output_dir / ".data_cache"))
    if args.max_samples:
        raw = raw.select(range(min(args.max_samples, len(raw))))
    dataset = tokenize_for_generation(raw, tokenizer, data)
    model = load_model(args.model, args.checkpoint, args.quantization_bit, args.torch_dtype)
    path = output_dir / "generated_predictions.txt"
    task = None if args.task == "none" else args.task
    metrics = evaluate_dataset(
        model, tokenizer, dataset, generation, path, task=task, batch_size=args.batch_size, seed=args.seed
    )
    speed = metrics.pop("speed")
    atomic_write_text(output_dir / "generation_speed.json", json.dumps(speed, indent=2) + "\n")
    atomic_write_text(output_dir / "metrics.json", json.dumps(metrics, indent=2, ensure_ascii=False) + "\n")
    print(f"wrote {path} ({speed['examples']} examples, {speed['examples_per_second']} ex/s, "
          f"{speed['new_tokens_per_second']} new tokens/s)", flush=True)  # fmt: skip
    if retention.retention:
        score_retention(args, data, retention, model, tokenizer)
    return path


def score_retention(
    args: EvaluateArguments, data: Any, settings: Any, model: Any, tokenizer: Any
) -> dict[str, Any]:
    """The general set with the checkpoint's method on and for the bare backbone (loaded again when the checkpoint
    is a whole fine-tuned model); writes ``retention.json``, ``retention_table.md`` and the probes' answers."""
    from .files import atomic_write_text
    from .loading import load_model
    from .methods import tuning_of
    from .retention import ANSWERS_FILE, RetentionSet, write_answers
    from .training.scoring import comparison_table

    output_dir = Path(args.output_dir)
    general = RetentionSet(
        settings, tokenizer, args.batch_size, data.max_source_length, data.max_target_length
    )
    after, answers = general.score(model)
    write_answers(output_dir / ANSWERS_FILE, answers)
    before = None
    if args.checkpoint:
        handle = tuning_of(model)
        if handle.saves_backbone:  # no bare backbone inside a fully fine-tuned model
            bare = load_model(args.model, None, args.quantization_bit, args.torch_dtype)
            before, answers = general.score(bare)
        else:
            with handle.bare():
                before, answers = general.score(model)
        write_answers(output_dir / "before" / ANSWERS_FILE, answers)
    method = tuning_of(model).name if args.checkpoint else "backbone"
    table = comparison_table(None, None, method, before, after, general.labels)
    scores = {"before": before, "after": after} if args.checkpoint else {"backbone": after}
    atomic_write_text(output_dir / "retention.json", json.dumps(scores, indent=2, ensure_ascii=False) + "\n")
    atomic_write_text(output_dir / "retention_table.md", table + "\n")
    print(f"\ngeneral ability ({args.checkpoint or args.model}):\n{table}\n", flush=True)
    return scores


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as err:  # OSError: missing files, Hub/loading errors
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
