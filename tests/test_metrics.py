"""Metric definitions on small hand-checkable examples, file reading errors, and the evaluate/rouge.py CLI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jieba
import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from rouge_chinese import Rouge

REPO = Path(__file__).resolve().parents[1]
# The package is not installed; a bare `pytest` only puts tests/ on sys.path.
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from ptuning_v2.metrics import (  # noqa: E402
    accuracy,
    all_metrics,
    detect_task,
    exact_match,
    generation_metrics,
    ner_scores,
    read_predictions,
)
from ptuning_v2.tasks import format_entities  # noqa: E402

KEYS = ("rouge-1", "rouge-2", "rouge-l", "bleu-4")
SENTENCE = "今天天气很好，我们一起去公园散步吧。"


def write_jsonl(path: Path, pairs: list[tuple[str, str]]) -> Path:
    lines = [json.dumps({"labels": label, "predict": pred}, ensure_ascii=False) for pred, label in pairs]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_identical_strings_score_100():
    assert generation_metrics([SENTENCE], [SENTENCE]) == dict.fromkeys(KEYS, 100.0)


def test_disjoint_strings_score_0():
    assert generation_metrics(["苹果香蕉橘子"], ["汽车飞机轮船"]) == dict.fromkeys(KEYS, 0.0)


@pytest.mark.parametrize(("pred", "label"), [("", SENTENCE), (SENTENCE, ""), ("  \n", SENTENCE), ("", "")])
def test_empty_or_blank_side_scores_0(pred, label):
    assert generation_metrics([pred], [label]) == dict.fromkeys(KEYS, 0.0)


def test_mean_of_per_pair_scores_matches_reference_libraries():
    preds = ["今天天气不错，适合出门。", SENTENCE]
    labels = ["今天天气很好，适合出去玩。", SENTENCE]
    rouge_l, bleu = [], []
    for pred, label in zip(preds, labels):
        hyp, ref = " ".join(jieba.cut(pred)), " ".join(jieba.cut(label))
        rouge_l.append(Rouge().get_scores(hyp, ref)[0]["rouge-l"]["f"] * 100)
        smooth = SmoothingFunction().method3
        bleu.append(sentence_bleu([list(label)], list(pred), smoothing_function=smooth) * 100)
    scores = generation_metrics(preds, labels)
    assert scores["rouge-l"] == round(sum(rouge_l) / 2, 4)
    assert scores["bleu-4"] == round(sum(bleu) / 2, 4)
    assert 0 < scores["rouge-l"] < 100  # the second pair alone would give 100


def test_words_bleu_is_on_0_to_1_scale_and_rouge_unchanged():
    preds, labels = ["今天天气不错，适合出门。"], ["今天天气很好，适合出去玩。"]
    chars, words = generation_metrics(preds, labels), generation_metrics(preds, labels, bleu="words")
    assert 0 < words["bleu-4"] < 1
    assert generation_metrics([SENTENCE], [SENTENCE], bleu="words")["bleu-4"] == 1.0
    assert {k: words[k] for k in KEYS[:3]} == {k: chars[k] for k in KEYS[:3]}
    with pytest.raises(ValueError, match="bleu"):
        generation_metrics(preds, labels, bleu="tokens")


def test_mismatched_or_empty_inputs_raise():
    with pytest.raises(ValueError, match="1 predictions but 2 labels"):
        generation_metrics(["a"], ["a", "b"])
    with pytest.raises(ValueError, match="no"):
        exact_match([], [])


def test_ner_partial_match():
    gold = format_entities({"人名": ["江泽民", "李鹏"], "地名": ["北京"]})  # 3 entities
    pred = format_entities({"人名": ["江泽民"], "地名": ["上海"]})  # 2 predicted, 1 correct
    assert ner_scores([pred], [gold]) == {
        "entity-precision": 50.0,
        "entity-recall": 33.3333,
        "entity-f1": 40.0,
    }


def test_ner_malformed_answer_counts_as_wrong():
    gold = format_entities({"人名": ["江泽民"], "地名": ["北京"]})
    scores = ner_scores(["江泽民和北京", "人名：江泽民；地名：北京"], [gold, gold])
    assert scores == {"entity-precision": 100.0, "entity-recall": 50.0, "entity-f1": 66.6667}


def test_ner_no_entities_anywhere_is_perfect():
    none = format_entities({})
    assert ner_scores([none], [none])["entity-f1"] == 100.0


def test_accuracy_and_exact_match():
    assert accuracy([" 正面\n", "负面", "正面", "中性"], ["正面", "正面", "正面", "负面"]) == 50.0
    assert exact_match(["abc ", "abd", "x"], ["abc", "abc", " x"]) == 66.6667


def test_detect_task():
    ner = format_entities({"人名": ["江泽民"]})
    assert detect_task(["正面", " 负面 "]) == "sentiment"
    assert detect_task([ner, format_entities({})]) == "ner"
    assert detect_task([ner, "正面"]) is None
    assert detect_task(["人名：江泽民；地名：北京", "机构名：新华社"]) == "ner"
    assert detect_task(["地名：北京；人名：江泽民"]) is None  # types out of order
    assert detect_task(["人名：江泽民；人名：李鹏"]) is None  # a type twice
    assert detect_task(["人名："]) is None  # a type without an entity
    assert detect_task(["人名：江泽民；职位：主席"]) is None
    assert detect_task(["无", "无"]) is None  # nothing shows it is NER
    assert detect_task([SENTENCE]) is None
    assert detect_task([]) is None


def test_all_metrics_adds_task_metrics():
    sentiment = all_metrics(["正面", "负面"], ["正面", "正面"])
    assert set(sentiment) == {*KEYS, "exact-match", "accuracy"}
    assert sentiment["accuracy"] == sentiment["exact-match"] == 50.0
    ner = format_entities({"人名": ["江泽民"]})
    assert "entity-f1" in all_metrics([ner], [ner])
    assert set(all_metrics([ner], [ner], task="none")) == {*KEYS, "exact-match"}
    assert "accuracy" in all_metrics([SENTENCE], [SENTENCE], task="sentiment")
    with pytest.raises(ValueError, match="task"):
        all_metrics([SENTENCE], [SENTENCE], task="qa")


def test_read_predictions_ok(tmp_path):
    path = write_jsonl(tmp_path / "p.txt", [("预测一", "标签一"), ("预测二", "标签二")])
    path.write_text(path.read_text(encoding="utf-8") + "\n  \n", encoding="utf-8")  # trailing blank lines
    assert read_predictions(path) == (["预测一", "预测二"], ["标签一", "标签二"])


@pytest.mark.parametrize(
    ("second_line", "message"),
    [
        ('{"labels": "a", "predict": ', "bad JSON"),
        ('{"labels": "a", "prompt": "q"}', "missing key 'predict' (keys present: 'labels', 'prompt')"),
        ('{"labels": 3, "predict": "a"}', "'labels' must be a string, got number"),
        ('["a", "b"]', "expected a JSON object"),
    ],
)
def test_read_predictions_errors_name_file_and_line(tmp_path, second_line, message):
    path = tmp_path / "p.txt"
    path.write_text('{"labels": "a", "predict": "a"}\n\n' + second_line + "\n", encoding="utf-8")
    with pytest.raises(ValueError) as info:
        read_predictions(path)
    assert f"{path}:3:" in str(info.value)
    assert message in str(info.value)


def test_read_predictions_empty_or_missing_file(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(ValueError, match="empty.txt"):
        read_predictions(empty)
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        read_predictions(tmp_path / "missing.txt")


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "evaluate/rouge.py", *args]
    return subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)


def test_cli_one_file_prints_flat_json_last(tmp_path):
    path = write_jsonl(tmp_path / "generated_predictions.txt", [(SENTENCE, SENTENCE)])
    result = run_cli("--predictions", str(path), "--task", "none")
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary == {**dict.fromkeys(KEYS, 100.0), "exact-match": 100.0}


def test_cli_two_files_side_by_side(tmp_path):
    (tmp_path / "run1").mkdir()
    (tmp_path / "run2").mkdir()
    first = write_jsonl(
        tmp_path / "run1" / "generated_predictions.txt", [(SENTENCE, SENTENCE), ("", SENTENCE)]
    )
    second = write_jsonl(tmp_path / "run2" / "generated_predictions.txt", [("正面", "正面")])
    # Different test sets (2 pairs vs 1) are refused unless asked for; see tests/test_bad_input_files.py.
    result = run_cli("--predictions", str(first), str(second), "--allow-different-sets")
    assert result.returncode == 0, result.stderr
    assert "holds 2 pairs but" in result.stderr
    lines = result.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    assert {k: summary[k] for k in KEYS} == dict.fromkeys(KEYS, 50.0)
    assert summary["exact-match"] == 50.0
    assert set(summary["files"]) == {str(first), str(second)}
    assert summary["files"][str(second)]["accuracy"] == 100.0
    table = "\n".join(lines[:-1])
    assert "run1" in table and "run2" in table and "pairs" in table


def test_cli_bad_file_exits_2_naming_the_line(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text('{"labels": "a", "predict": "a"}\nnot json\n', encoding="utf-8")
    result = run_cli("--predictions", str(bad))
    assert result.returncode == 2
    assert f"{bad}:2" in result.stderr
    assert "Traceback" not in result.stderr
