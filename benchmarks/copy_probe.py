"""How well a backbone repeats a sentence it has never seen: the copy skill that extraction by generation needs.

    python -m benchmarks.copy_probe --models models/glm-zh-tiny /path/to/other/backbone

Each model gets ``复述这句话：<sentence>`` (the copy chat of the pretraining mix) for the first sentences of
``data/seg/dev.json`` (dev sentences never appear in pretraining), cut to ``--max_chars`` characters, and answers
greedily. Reported: exact copies, and the mean share of the sentence repeated correctly before the first wrong
character. Prints a markdown table and writes it, with the raw numbers, to ``benchmarks/results/``.
"""

from __future__ import annotations

import argparse
import json

from benchmarks.report import write_report
from ptuning_v2.data import generation_prompt_ids
from ptuning_v2.generation import GenerationSettings, generate_texts
from ptuning_v2.loading import load_model, load_tokenizer
from ptuning_v2.tasks import COPY_INSTRUCTION  # the copy chat the backbone was pretrained on


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["models/glm-zh-tiny"])
    parser.add_argument("--sentences_file", default="data/seg/dev.json")
    parser.add_argument("--num_sentences", type=int, default=100)
    parser.add_argument("--max_chars", type=int, default=60)
    parser.add_argument("--out", default="benchmarks/results/copy_probe")
    return parser.parse_args()


def read_sentences(path: str, count: int, max_chars: int) -> list[str]:
    """The unsegmented sentences of a ``seg`` split (its summary is the sentence with spaces between words)."""
    sentences = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if len(sentences) == count:
                break
            row = json.loads(line)
            if "summary" not in row:
                raise ValueError(f"{path}:{n}: no 'summary' field")
            sentences.append(row["summary"].replace(" ", "")[:max_chars])
    return sentences


def copied_share(sentence: str, answer: str) -> float:
    """Share of ``sentence`` that ``answer`` repeats before its first wrong character."""
    n = 0
    while n < min(len(sentence), len(answer)) and sentence[n] == answer[n]:
        n += 1
    return n / len(sentence)


def probe(model_dir: str, sentences: list[str]) -> dict:
    tokenizer = load_tokenizer(model_dir)
    model = load_model(model_dir)
    prompts = [
        generation_prompt_ids([{"role": "user", "content": COPY_INSTRUCTION + s}], tokenizer)
        for s in sentences
    ]
    settings = GenerationSettings(max_new_tokens=max(len(s) for s in sentences) + 8)
    answers, speed = generate_texts(model, tokenizer, prompts, settings, progress=False, batch_size=16)
    return {
        "model": model_dir,
        "sentences": len(sentences),
        "exact_copies": sum(a == s for a, s in zip(answers, sentences)),
        "mean_copied_share": round(sum(map(copied_share, sentences, answers)) / len(sentences), 4),
        "seconds": speed["seconds"],
        "examples": [{"sentence": s, "answer": a} for s, a in list(zip(sentences, answers))[:5]],
    }


def main() -> None:
    args = parse_args()
    sentences = read_sentences(args.sentences_file, args.num_sentences, args.max_chars)
    rows = [probe(model_dir, sentences) for model_dir in args.models]
    table = ["| model | exact copies | mean share copied before the first error |", "|---|---:|---:|"]
    for row in rows:
        table.append(
            f"| `{row['model']}` | {row['exact_copies']}/{row['sentences']} | {row['mean_copied_share']:.1%} |"
        )
    settings = f"greedy; the first {len(sentences)} sentences of {args.sentences_file}, at most {args.max_chars} characters"
    write_report(args.out, table, settings, {"args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
