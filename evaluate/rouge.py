"""Score ``generated_predictions.txt`` files with the official ChatGLM metrics plus task metrics.

    python evaluate/rouge.py --predictions output/run1/generated_predictions.txt [MORE ...] \\
        [--task auto|ner|sentiment|none] [--bleu chars|words]

Prints a table (one column per file) and, as the last line of stdout, one JSON object: the metrics of
the first file as flat keys and, when several files are given, ``"files": {path: {metrics}}`` for all.
Bad input: a message naming ``file:line`` on stderr and exit code 2.

Several files are compared side by side only when they hold the same test set: the same number of pairs
and the same labels in the same order. Otherwise it is an error (exit code 2) naming both files and both
counts, unless ``--allow-different-sets`` turns it into a warning. A file whose predictions (or labels) are
all empty gets a warning on stderr: every score is then 0, which usually means generation went wrong.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

# Run from a checkout without installing the package.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ptuning_v2.metrics import BLEU_MODES, TASKS, all_metrics, read_predictions  # noqa: E402

MAX_HEADER = 40


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--predictions",
        nargs="+",
        required=True,
        metavar="FILE",
        help='JSON-lines files of {"labels": ..., "predict": ...}',
    )
    parser.add_argument(
        "--task",
        choices=TASKS,
        default="auto",
        help="task metrics to add; auto detects NER/sentiment from the labels",
    )
    parser.add_argument(
        "--bleu",
        choices=BLEU_MODES,
        default="chars",
        help="chars: ChatGLM-6B/2 BLEU-4 on characters, x100; "
        "words: ChatGLM3/GLM-4 BLEU-4 on jieba words, 0..1",
    )
    parser.add_argument(
        "--allow-different-sets",
        action="store_true",
        help="score files that hold different numbers of pairs or different labels side by side anyway "
        "(a warning instead of an error)",
    )
    return parser.parse_args(argv)


def short_names(paths: list[str]) -> list[str]:
    """Column headers: drop the directories and trailing names every path shares.

    ``out/a/generated_predictions.txt`` and ``out/b/generated_predictions.txt`` become ``a`` and ``b``.
    """
    parts = [Path(path).parts for path in paths]
    if len(paths) == 1:
        names = ["/".join(parts[0][-2:])]
    else:
        shortest = min(len(p) for p in parts)
        prefix = 0
        while prefix < shortest - 1 and len({p[prefix] for p in parts}) == 1:
            prefix += 1
        suffix = 0
        while suffix < shortest - prefix - 1 and len({p[-1 - suffix] for p in parts}) == 1:
            suffix += 1
        names = ["/".join(p[prefix : len(p) - suffix]) for p in parts]
    if len(set(names)) != len(names) or not all(names):
        names = list(paths)  # e.g. the same file twice: nothing sensible to drop
    return [name if len(name) <= MAX_HEADER else "…" + name[-(MAX_HEADER - 1) :] for name in names]


def format_table(paths: list[str], results: list[dict[str, float]], counts: list[int]) -> str:
    rows = list(dict.fromkeys(key for result in results for key in result))
    headers = short_names(paths)
    cells = [[f"{result[row]:.4f}" if row in result else "-" for result in results] for row in rows]
    cells.append([str(count) for count in counts])
    labels = [*rows, "pairs"]
    label_width = max(len("metric"), *(len(label) for label in labels))
    widths = [max(len(header), *(len(row[i]) for row in cells)) for i, header in enumerate(headers)]
    lines = ["  ".join(["metric".ljust(label_width), *(h.rjust(w) for h, w in zip(headers, widths))])]
    lines.append("  ".join(["-" * label_width, *("-" * w for w in widths)]))
    for label, row in zip(labels, cells):
        lines.append("  ".join([label.ljust(label_width), *(c.rjust(w) for c, w in zip(row, widths))]))
    return "\n".join(lines)


def _preview(text: str, width: int = 30) -> str:
    return repr(text if len(text) <= width else text[:width] + "…")


def compare_test_sets(paths: list[str], labels: list[list[str]]) -> list[str]:
    """Why the files' columns would not be comparable: each file against the first, by count then labels."""
    problems = []
    first_path, first = paths[0], labels[0]
    for path, other in zip(paths[1:], labels[1:]):
        if len(other) != len(first):
            problems.append(f"{first_path} holds {len(first)} pairs but {path} holds {len(other)}")
            continue
        differ = [i for i, (a, b) in enumerate(zip(first, other)) if a != b]
        if differ:
            i = differ[0]
            problems.append(
                f"{first_path} and {path} both hold {len(first)} pairs but {len(differ)} of their labels differ, "
                f"first at pair {i + 1} ({_preview(first[i])} vs {_preview(other[i])})"
            )
    return problems


def empty_warnings(path: str, predictions: list[str], labels: list[str]) -> list[str]:
    warnings = []
    if not any(p.strip() for p in predictions):
        warnings.append(
            f"{path}: all {len(predictions)} predictions are empty, so every score is 0; did generation fail "
            "(a broken prefix checkpoint, a model that stops at once)?"
        )
    if not any(label.strip() for label in labels):
        warnings.append(f"{path}: all {len(labels)} labels are empty, so every score is 0")
    return warnings


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    pairs: list[tuple[list[str], list[str]]] = []
    for path in args.predictions:
        try:
            pairs.append(read_predictions(path))
        except (OSError, ValueError) as exc:
            print(f"rouge.py: error: {exc}", file=sys.stderr)
            return 2
    problems = compare_test_sets(args.predictions, [labels for _, labels in pairs])
    if problems and not args.allow_different_sets:
        for problem in problems:
            print(f"rouge.py: error: {problem}", file=sys.stderr)
        print(
            "rouge.py: error: these files were not scored on the same test set, so their columns are not "
            "comparable (pass --allow-different-sets to score them anyway)",
            file=sys.stderr,
        )
        return 2
    for problem in problems:
        print(
            f"rouge.py: warning: {problem} (not the same test set; columns are not comparable)",
            file=sys.stderr,
        )
    results: list[dict[str, float]] = []
    counts: list[int] = []
    for path, (predictions, labels) in zip(args.predictions, pairs):
        for warning in empty_warnings(path, predictions, labels):
            print(f"rouge.py: warning: {warning}", file=sys.stderr)
        results.append(all_metrics(predictions, labels, task=args.task, bleu=args.bleu))
        counts.append(len(predictions))

    print(format_table(args.predictions, results, counts))
    summary: dict[str, object] = dict(results[0])
    if len(results) > 1:
        summary["files"] = dict(zip(args.predictions, results))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
