"""NLU heads (``--task_type seq_cls|token_cls``, ptuning_v2/nlu.py): span scoring, token alignment, padding and
the virtual-token logits; training, predicting and reloading through scripts/train_pt2.sh on a tiny backbone made
here; every method with either head; multi-task training on a mix of files and the warm start from it."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from script_runs import train_through_script
from test_train import ner_rows, write_jsonl
from tiny_models import save_tiny_backbone

from ptuning_v2 import load_model, load_tokenizer, nlu
from ptuning_v2.data import DataConfig
from ptuning_v2.methods import METHODS
from ptuning_v2.train import _conversations, main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
GOOD, BAD = ["好用", "满意", "推荐", "喜欢"], ["难用", "失望", "垃圾", "后悔"]
TYPES = {"PER": ["张三", "李四"], "LOC": ["北京", "上海"], "ORG": ["新华社", "人民日报"]}


def sentiment_rows(n: int = 16, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"text": f"这个东西{rng.choice(GOOD if label else BAD)}。", "label": label}
        for label in (rng.randint(0, 1) for _ in range(n))
    ]


def _tagged(word: str, kind: str) -> list[str]:
    return [f"B-{kind}"] + [f"I-{kind}"] * (len(word) - 1)


def ner_nlu_rows(n: int = 16, seed: int = 0) -> list[dict]:
    """``{"tokens": chars, "tags": BIO}`` for sentences like 张三在北京见到新华社记者。"""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        name, place, org = (rng.choice(TYPES[k]) for k in ("PER", "LOC", "ORG"))
        tokens = list(f"{name}在{place}见到{org}记者。")
        tags = _tagged(name, "PER") + ["O"] + _tagged(place, "LOC") + ["O", "O"] + _tagged(org, "ORG")
        rows.append({"tokens": tokens, "tags": tags + ["O"] * (len(tokens) - len(tags))})
    return rows


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("nlu")
    write_jsonl(root / "sentiment.json", sentiment_rows())
    write_jsonl(root / "ner.json", ner_nlu_rows())
    write_jsonl(root / "ner_gen.json", ner_rows())
    write_jsonl(
        root / "sentiment_gen.json", [{"content": r["text"], "summary": "正面"} for r in sentiment_rows()]
    )
    texts = (
        [r["text"] for r in sentiment_rows()] + [r["content"] + r["summary"] for r in ner_rows()] + ["正面"]
    )
    save_tiny_backbone(root / "model", texts, initializer_range=0.2)
    return root


# ---------------------------------------------------------------------------------------------- scoring


def test_bio_spans_read_like_seqeval():
    tags = ["B-PER", "I-PER", "O", "I-LOC", "I-LOC", "B-ORG", "B-ORG", "I-PER", "I-LOC"]
    assert nlu.bio_spans(tags) == {
        ("PER", 0, 2),
        ("LOC", 3, 5),  # I- after O starts a chunk
        ("ORG", 5, 6),
        ("ORG", 6, 7),  # B- after B- of the same type: a new chunk
        ("PER", 7, 8),  # I- of another type starts one too
        ("LOC", 8, 9),
    }
    assert nlu.bio_spans(["O", "O"]) == set()


def test_span_scores_need_span_and_type_exactly():
    gold = [["B-PER", "I-PER", "O", "B-LOC"], ["B-ORG", "I-ORG", "I-ORG"]]
    predicted = [["B-PER", "I-PER", "O", "B-ORG"], ["B-ORG", "I-ORG", "O"]]  # right, wrong type, cut short
    scores = nlu.span_scores(gold, predicted)
    assert scores == {"span-precision": 33.3333, "span-recall": 33.3333, "span-f1": 33.3333}
    assert nlu.span_scores(gold, gold)["span-f1"] == 100.0
    assert nlu.span_scores([["O"]], [["O"]])["span-f1"] == 0.0  # nothing to find, nothing found


def test_tokens_carry_the_tag_of_the_character_they_start_at():
    # [gMASK] sop ▁ 张 三 在 | SentencePiece's dummy ▁ shares 张's span; 北京 as one piece; the last char cut off
    offsets = [(0, 0), (0, 0), (0, 1), (0, 1), (1, 2), (2, 3), (3, 5)]
    tokens = ["张", "三", "在", "北", "京", "。"]
    cover = nlu._cover(offsets, tokens)
    assert cover == [3, 4, 5, 6, 6, -1]
    example = {"cover": cover, "gold": ["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O"]}
    labels = ["B-LOC", "B-PER", "I-PER", "O"]
    predicted = [3, 3, 0, 1, 2, 3, 0]  # per token; the ▁ (index 2) is ignored
    assert nlu.character_tags(example, predicted, labels) == ["B-PER", "I-PER", "O", "B-LOC", "I-LOC", "O"]


def test_real_tokenizer_alignment_gives_back_the_gold_spans():
    tokenizer = load_tokenizer(str(ROOT / "models/glm-zh-tiny"))
    rows = ner_nlu_rows(8) + [
        {"tokens": [*"１９３１年，", "VISTA", *"在北京"], "tags": ["O"] * 8 + ["B-LOC", "I-LOC"]}
    ]
    labels = ["B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER", "O"]
    examples = nlu.tokenize_rows(rows, tokenizer, "token_cls", labels, 128, "test")
    perfect = [
        [max(label, 0) for label in e["labels"]] for e in examples
    ]  # the gold tag wherever there is one
    predicted = [nlu.character_tags(e, p, labels) for e, p in zip(examples, perfect)]
    assert predicted == [r["tags"] for r in rows]


def test_left_padding_and_ignored_label_padding():
    collate = nlu.collator(pad_token_id=0)
    batch = collate([{"input_ids": [5, 6, 7], "labels": [1, 2, -100]}, {"input_ids": [8], "labels": [3]}])
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 8]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert batch["labels"].tolist() == [[1, 2, -100], [-100, -100, 3]]
    assert collate([{"input_ids": [5], "labels": 1}, {"input_ids": [6, 7], "labels": 0}])[
        "labels"
    ].tolist() == [1, 0]


def test_loss_ignores_the_virtual_token_positions():
    logits = torch.randn(2, 4 + 3, 5)  # P=4 virtual tokens in front of 3 real ones
    labels = torch.tensor([[1, 2, -100], [0, 4, 3]])
    outputs = type("Out", (), {"logits": logits})()
    real = logits[:, 4:]
    expected = torch.nn.functional.cross_entropy(real.reshape(-1, 5), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(nlu.loss(outputs, labels), expected)
    pooled = type("Out", (), {"logits": logits[:, -1]})()  # a sequence head: one row of logits each
    torch.testing.assert_close(
        nlu.loss(pooled, torch.tensor([1, 3])),
        torch.nn.functional.cross_entropy(logits[:, -1], torch.tensor([1, 3])),
    )


def test_bad_rows_name_file_and_line(tmp_path):
    bad = write_jsonl(tmp_path / "bad.json", [*ner_nlu_rows(2), {"tokens": ["张"]}])
    with pytest.raises(ValueError, match=r"bad.json:3: missing field 'tags'"):
        nlu.read_rows(str(bad), "token_cls")
    short = write_jsonl(tmp_path / "short.json", [{"tokens": ["张", "三"], "tags": ["B-PER"]}])
    with pytest.raises(ValueError, match=r"short.json:1: field 'tags' must be .* one per token"):
        nlu.read_rows(str(short), "token_cls")
    tokenizer = lambda texts, **kwargs: {"input_ids": [[1]] * len(texts)}  # noqa: E731
    with pytest.raises(ValueError, match="label 'neutral' is not among the training file's labels"):
        nlu.tokenize_rows([{"text": "x", "label": "neutral"}], tokenizer, "seq_cls", [0, 1], 8, "dev.json")


# ---------------------------------------------------------------------------------------------- through the script


def train_script(workdir: Path, out: Path, *settings: str) -> str:
    """The script's settings check and command, run in this process; what both printed."""
    return train_through_script(
        f"MODEL={workdir / 'model'}", f"OUTPUT_DIR={out}",
        "PRE_SEQ_LEN=4", "MAX_STEPS=4", "SAVE_STEPS=2", "BATCH_SIZE=4", "LOGGING_STEPS=1", "SEED=3",
        "MAX_SOURCE_LENGTH=32", "MAX_TARGET_LENGTH=24", *settings, "--report_to", "none",
    )  # fmt: skip


@pytest.mark.parametrize(
    ("task_type", "data", "method", "metric"),
    [
        ("token_cls", "ner.json", "prompt_tuning", "span-f1"),  # virtual tokens: P extra logits to strip
        ("seq_cls", "sentiment.json", "ptuning_v2", "accuracy"),
    ],
)
def test_head_trains_predicts_and_reloads_through_the_script(
    workdir, tmp_path, task_type, data, method, metric
):
    out = tmp_path / "run"
    file = workdir / data
    result = train_script(
        workdir, out, f"TASK_TYPE={task_type}", f"METHOD={method}", "LR=0.05", f"TRAIN_FILE={file}",
        f"VALIDATION_FILE={file}", f"TEST_FILE={file}", "COMPARE_WITH_BASE=true",
    )  # fmt: skip
    assert "--compare_with_base skipped" in result
    results = json.loads((out / "all_results.json").read_text())
    assert results["eval"]["before"] is None and 0 <= results["eval"]["after"][metric] <= 100
    assert results["predict"][metric] == results["eval"]["after"][metric]  # same file, same head
    assert results["train"]["train_loss"] > 0
    assert f"| {metric} |" in (out / "eval_table.md").read_text()
    rows = [json.loads(line) for line in (out / "predict" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == 16
    labels = nlu.label_set(nlu.read_rows(str(file), task_type), task_type, str(file))
    assert nlu.read_labels(out) == (task_type, labels) == nlu.read_labels(out / "checkpoint-2")
    # The head is saved with the method.
    saved = load_file(next(out.glob("*_model.safetensors")))
    assert [k for k in saved if k.startswith("head.")]
    # Evaluating the checkpoint alone (its labels.json says what the outputs mean) gives the same scores.
    again = tmp_path / "eval"
    main([
        "--model_name_or_path", str(workdir / "model"), "--ptuning_checkpoint", str(out), "--method", method,
        "--task_type", task_type,
        "--validation_file", str(file), "--do_eval", "--output_dir", str(again), "--report_to", "none",
        "--max_source_length", "32",
    ])  # fmt: skip
    assert json.loads((again / "all_results.json").read_text())["eval"]["after"] == results["eval"]["after"]
    kwargs = nlu.model_kwargs(task_type, labels, load_tokenizer(str(workdir / "model")).pad_token_id)
    model = load_model(str(workdir / "model"), str(out), **kwargs)
    assert model.tuning.name == method and model.config.num_labels == len(labels)


@pytest.mark.slow
@pytest.mark.parametrize("task_type", ["seq_cls", "token_cls"])
@pytest.mark.parametrize("method", list(METHODS))
def test_every_method_trains_either_head(workdir, tmp_path, method, task_type):
    """Forward, backward and predict: the loss falls over the steps, and the head trains with the method."""
    file = workdir / ("sentiment.json" if task_type == "seq_cls" else "ner.json")
    lr = {"lora": "0.01", "full": "0.001", "prefix_tuning": "0.01", "ptuning_v1": "0.01"}.get(method, "0.1")
    out = tmp_path / "run"
    results = main([
        "--model_name_or_path", str(workdir / "model"), "--method", method, "--task_type", task_type,
        "--train_file", str(file), "--validation_file", str(file), "--do_train", "--do_eval", "--max_steps", "12",
        "--per_device_train_batch_size", "8", "--learning_rate", lr, "--pre_seq_len", "4", "--logging_steps", "1",
        "--output_dir", str(out), "--report_to", "none", "--save_steps", "12", "--seed", "1",
        "--max_source_length", "32", "--lr_scheduler_type", "constant",
    ])  # fmt: skip
    state = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert min(losses[-3:]) < losses[0], losses
    assert results["eval"]["after"]


# ---------------------------------------------------------------------------------------------- multi-task


def test_a_mix_of_files_is_one_shuffled_dataset_fixed_by_the_seed(workdir, tmp_path):
    paths = [str(workdir / "ner_gen.json"), str(workdir / "sentiment_gen.json")]
    config = DataConfig()
    first = _conversations(paths, config, str(tmp_path / "cache"), seed=1)
    assert len(first) == 32
    contents = [m[0]["content"] for m in first["messages"]]
    assert sum(c.startswith("找出实体") for c in contents) == 16
    assert contents[:16] != [
        m[0]["content"] for m in _conversations(paths[:1], config, str(tmp_path), 1)["messages"]
    ]
    again = _conversations(paths, config, str(tmp_path / "cache2"), seed=1)
    assert [m[0]["content"] for m in again["messages"]] == contents
    other = _conversations(paths, config, str(tmp_path / "cache3"), seed=2)
    assert [m[0]["content"] for m in other["messages"]] != contents


def test_multi_task_prefix_then_warm_start_on_the_target(workdir, tmp_path):
    mix, target, scratch = tmp_path / "mix", tmp_path / "target", tmp_path / "scratch"
    files = f"{workdir / 'ner_gen.json'},{workdir / 'sentiment_gen.json'}"
    result = train_script(
        workdir, mix, f"TRAIN_FILE={files}", "VALIDATION_FILE=", "LR=0.3", "PREFIX_DROPOUT=0"
    )
    assert "ner_gen.json," in result and "tokenized 32 examples" in result
    assert yaml.safe_load((mix / "run_config.yaml").read_text())["train_file"] == files
    # A learning rate of 1e-12 leaves the warm-started prefix where the mix left it; a fresh one is elsewhere.
    common = [f"TRAIN_FILE={workdir / 'ner_gen.json'}", "VALIDATION_FILE=", "LR=1e-12", "PREFIX_DROPOUT=0"]
    train_script(workdir, target, *common, f"PTUNING_CHECKPOINT={mix}")
    train_script(workdir, scratch, *common)
    pretrained = load_file(mix / "prefix_model.safetensors")["embedding.weight"]
    torch.testing.assert_close(load_file(target / "prefix_model.safetensors")["embedding.weight"], pretrained)
    assert not torch.allclose(load_file(scratch / "prefix_model.safetensors")["embedding.weight"], pretrained)


def test_nlu_settings_are_checked_before_anything_runs(workdir, tmp_path):
    refused = subprocess.run(
        ["bash", str(ROOT / "scripts/train_pt2.sh"), "TASK_TYPE=ner"],
        cwd=ROOT,
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert (
        refused.returncode == 2 and "TASK_TYPE must be one of: generation seq_cls token_cls" in refused.stderr
    )
    two = f"{workdir / 'ner.json'},{workdir / 'ner.json'}"
    with pytest.raises(ValueError, match="--task_type token_cls takes one file"):
        main(
            [
                "--task_type",
                "token_cls",
                "--train_file",
                two,
                "--do_train",
                "--output_dir",
                str(tmp_path / "a"),
            ]
        )
    with pytest.raises(ValueError, match="without --do_train needs --ptuning_checkpoint"):
        main(["--task_type", "seq_cls", "--validation_file", str(workdir / "sentiment.json"), "--do_eval",
              "--output_dir", str(tmp_path / "b")])  # fmt: skip
    with pytest.raises(ValueError, match="--task_type 'ner': must be one of generation, seq_cls, token_cls"):
        main(["--task_type", "ner", "--output_dir", str(tmp_path / "c")])
