"""Generate answers for a test file with a (prefix) model and write the official ``generated_predictions.txt``.

    python -m ptuning_v2.evaluate --model models/glm-zh-tiny --checkpoint output/ner --test_file data/ner/dev.json \\
        --output_dir output/ner/eval

Scores come from ``evaluate/rouge.py`` on the file this writes (``scripts/evaluate.sh`` runs both).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .data import DataConfig, load_conversations, tokenize_for_generation
from .generation import GenerationSettings, generate_texts, write_predictions
from .loading import check_model_path, load_model, load_tokenizer, quantization_config, resolve_dtype

BOOLEAN_WORDS = {
    **dict.fromkeys(("1", "true", "yes", "on", "y", "t"), True),
    **dict.fromkeys(("0", "false", "no", "off", "n", "f"), False),
}


def parse_bool(value: str | bool) -> bool:
    """A boolean flag's value: true/false, 1/0, yes/no, on/off in any case (train, evaluate and chat alike)."""
    if isinstance(value, bool):
        return value
    try:
        return BOOLEAN_WORDS[str(value).strip().lower()]
    except KeyError:
        raise argparse.ArgumentTypeError(
            f"expected true or false (also 1/0, yes/no, on/off), got {value!r}"
        ) from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="backbone directory (native or original ChatGLM2/3)")
    parser.add_argument(
        "--checkpoint", default=None, help="prefix checkpoint (ours, official or PEFT); none = bare"
    )
    parser.add_argument("--test_file", required=True)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=128)
    parser.add_argument("--max_samples", type=int, default=None)
    parser.add_argument("--quantization_bit", default=None)
    parser.add_argument("--torch_dtype", default=None)
    parser.add_argument(
        "--do_sample",
        type=parse_bool,
        nargs="?",
        const=True,
        default=False,
        help="sample with the official top_p/temperature (alone, or with true/false)",
    )
    parser.add_argument("--top_p", type=float, default=0.7)
    parser.add_argument("--temperature", type=float, default=0.95)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--prompt_column", default="content")
    parser.add_argument("--response_column", default="summary")
    parser.add_argument("--history_column", default=None)
    parser.add_argument("--max_source_length", type=int, default=256)
    args = parser.parse_args(argv)
    problems = settings_problems(args)
    if problems:
        parser.exit(2, "".join(f"error: {problem}\n" for problem in problems))
    return args


def settings_problems(args: argparse.Namespace) -> list[str]:
    """Everything wrong with the settings, found before anything is loaded, each naming its flag and value."""
    problems = []
    for flag in ("batch_size", "max_new_tokens", "max_source_length", "max_samples"):
        value = getattr(args, flag)
        if flag == "max_samples" and value is None:
            continue
        if value < 1:
            problems.append(f"--{flag} {value}: must be a positive number")
    if not 0 < args.top_p <= 1:
        problems.append(f"--top_p {args.top_p}: must be in (0, 1]")
    if args.temperature <= 0:
        problems.append(f"--temperature {args.temperature}: must be above 0")
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
    args = parse_args(argv)
    config = DataConfig(
        prompt_column=args.prompt_column,
        response_column=args.response_column,
        history_column=args.history_column,
        max_source_length=args.max_source_length,
    )
    output_dir = Path(args.output_dir)
    tokenizer = load_tokenizer(args.model)
    raw = load_conversations(args.test_file, config, cache_dir=str(output_dir / ".data_cache"))
    if args.max_samples:
        raw = raw.select(range(min(args.max_samples, len(raw))))
    dataset = tokenize_for_generation(raw, tokenizer, config)
    model = load_model(args.model, args.checkpoint, args.quantization_bit, args.torch_dtype)
    settings = GenerationSettings(
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        do_sample=args.do_sample,
        top_p=args.top_p,
        temperature=args.temperature,
        seed=args.seed,
    )
    prompts = [list(ids) for ids in dataset["input_ids"]]
    predictions, speed = generate_texts(model, tokenizer, prompts, settings)
    path = write_predictions(
        output_dir / "generated_predictions.txt", predictions, list(dataset["label_text"])
    )
    (output_dir / "generation_speed.json").write_text(json.dumps(speed, indent=2) + "\n")
    print(f"wrote {path} ({speed['examples']} examples, {speed['examples_per_second']} ex/s, "
          f"{speed['new_tokens_per_second']} new tokens/s)", flush=True)  # fmt: skip
    return path


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as err:  # OSError: missing files, Hub/loading errors
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
