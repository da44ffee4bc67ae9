"""Batched vs batch-1 evaluation speed, side by side, with a check that the greedy answers are identical.

    python -m benchmarks.eval_speed --model models/glm-zh-tiny --checkpoint output/ner-ptuning_v2-16-2e-2 \\
        --test_file data/ner/dev.json --num_examples 128 --batch_sizes 1 16 32

Prints a markdown table and writes it, with the raw numbers, to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json

from benchmarks.report import write_report
from ptuning_v2.data import DataConfig, load_conversations, tokenize_for_generation
from ptuning_v2.generation import GenerationSettings, generate_texts
from ptuning_v2.loading import load_model, load_tokenizer


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/glm-zh-tiny")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--test_file", default="data/ner/dev.json")
    parser.add_argument("--num_examples", type=int, default=128)
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[1, 16, 32])
    parser.add_argument("--max_new_tokens", type=int, default=48)
    parser.add_argument("--out", default="benchmarks/results/eval_speed")
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, args.checkpoint)
    config = DataConfig(max_source_length=256)
    raw = load_conversations(args.test_file, config)
    raw = raw.select(range(min(args.num_examples, len(raw))))
    prompts = [list(ids) for ids in tokenize_for_generation(raw, tokenizer, config)["input_ids"]]
    rows, reference = [], None
    for batch_size in args.batch_sizes:
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens)
        answers, speed = generate_texts(
            model, tokenizer, prompts, settings, progress=False, batch_size=batch_size
        )
        reference = reference if reference is not None else answers
        identical = sum(a == b for a, b in zip(answers, reference))
        rows.append({"batch_size": batch_size, **speed, "identical_to_first": identical})
        print(json.dumps(rows[-1]), flush=True)
    base = rows[0]["seconds"]
    table = [
        "| batch size | examples | seconds | examples/s | new tokens/s | speed-up | answers identical to batch "
        f"{rows[0]['batch_size']} |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        table.append(
            f"| {row['batch_size']} | {row['examples']} | {row['seconds']:.1f} | {row['examples_per_second']:.2f} | "
            f"{row['new_tokens_per_second']:.1f} | {base / row['seconds']:.1f}x | "
            f"{row['identical_to_first']}/{row['examples']} |"
        )
    write_report(
        args.out, table, f"greedy, max_new_tokens={args.max_new_tokens}", {"args": vars(args), "rows": rows}
    )


if __name__ == "__main__":
    main()
