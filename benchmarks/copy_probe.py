"""How well a backbone repeats a sentence it has never seen: the copy skill that extraction by generation needs.

    python -m benchmarks.copy_probe --models models/glm-zh-tiny /path/to/other/backbone

Each model gets ``复述这句话：<sentence>`` (the copy chat of the pretraining mix) for the first sentences of
``data/seg/dev.json`` (dev sentences never appear in pretraining), cut to ``--max_chars`` characters, and answers
greedily. Reported: exact copies, and the mean share of the sentence repeated correctly before the first wrong
character. The probe is the retention score's (``ptuning_v2.retention``, with the same defaults); this prints it
for whole backbones as a markdown table and writes it, with the raw numbers, to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import time

from benchmarks.report import write_report
from ptuning_v2.loading import load_model, load_tokenizer
from ptuning_v2.retention import RetentionSet, RetentionSettings

DEFAULTS = RetentionSettings()


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["models/glm-zh-tiny"])
    parser.add_argument("--sentences_file", default=DEFAULTS.retention_copy_file)
    parser.add_argument("--num_sentences", type=int, default=DEFAULTS.retention_copy_sentences)
    parser.add_argument("--max_chars", type=int, default=DEFAULTS.retention_copy_chars)
    parser.add_argument("--out", default="benchmarks/results/copy_probe")
    return parser.parse_args()


def probe(model_dir: str, args: argparse.Namespace) -> dict:
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir)
    copy_only = RetentionSettings(
        retention=True,
        retention_heldout_lines=0,
        retention_listing_sentences=0,
        retention_copy_file=args.sentences_file,
        retention_copy_sentences=args.num_sentences,
        retention_copy_chars=args.max_chars,
    )
    start = time.perf_counter()
    metrics, answers = RetentionSet(copy_only, tokenizer, batch_size=16).score(model)
    return {
        "model": model_dir,
        "sentences": len(answers),
        "exact_copies": sum(a["answer"] == a["reference"] for a in answers),
        "mean_copied_share": round(metrics["copy-share"] / 100, 4),
        "seconds": round(time.perf_counter() - start, 3),
        "examples": [{"sentence": a["reference"], "answer": a["answer"]} for a in answers[:5]],
    }


def main() -> None:
    args = parse_args()
    rows = [probe(model_dir, args) for model_dir in args.models]
    table = ["| model | exact copies | mean share copied before the first error |", "|---|---:|---:|"]
    for row in rows:
        table.append(
            f"| `{row['model']}` | {row['exact_copies']}/{row['sentences']} | {row['mean_copied_share']:.1%} |"
        )
    count = rows[0]["sentences"] if rows else args.num_sentences
    settings = (
        f"greedy; the first {count} sentences of {args.sentences_file}, at most {args.max_chars} characters"
    )
    write_report(args.out, table, settings, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
