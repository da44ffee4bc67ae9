"""The retention score (issue 24.1) on a tiny backbone: bare and with the method, numbers that move when the method
changes the answers, the before/after table, evaluate.py's --retention, a user's file, and every bad file named by
file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_train import train_args, write_jsonl
from tiny_models import save_tiny_backbone

from ptuning_v2 import retention
from ptuning_v2.evaluate import main as evaluate_main
from ptuning_v2.tasks import COPY_INSTRUCTION, listing_answer, listing_prompt, read_tagged
from ptuning_v2.train import main

SENTENCES = ["今天天气很好。", "我们去北京。", "这本书很好。"]
TAGGED = [
    (["我们", "去", "北京", "。"], ["r", "v", "ns", "w"]),
    (["他", "看", "书", "。"], ["r", "v", "n", "w"]),
]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("retention")
    (root / "heldout.txt").write_text("今天天气很好。\n\n他看书。\n", encoding="utf-8")
    write_jsonl(root / "seg_dev.json", [{"content": "分词：" + s, "summary": " ".join(s)} for s in SENTENCES])
    write_jsonl(root / "tagged.json", [{"words": w, "tags": t} for w, t in TAGGED])
    # The training file is the probes' own chats: a method that learns them changes the probes' answers.
    chats = [{"content": COPY_INSTRUCTION + s, "summary": s} for s in SENTENCES]
    chats += [
        {"content": listing_prompt(w, ["动词"]), "summary": listing_answer(w, t, ["动词"])} for w, t in TAGGED
    ]
    write_jsonl(root / "train.json", chats * 3)
    texts = [c["content"] + c["summary"] for c in chats] + ["分词：无"]
    save_tiny_backbone(root / "model", texts, initializer_range=0.2)
    return root


def general_set(workdir: Path, *extra: str) -> list[str]:
    return [
        "--retention", "true",
        "--retention_heldout_file", str(workdir / "heldout.txt"),
        "--retention_copy_file", str(workdir / "seg_dev.json"),
        "--retention_listing_file", str(workdir / "tagged.json"),
        *extra,
    ]  # fmt: skip


@pytest.mark.parametrize("method", ["ptuning_v2", "full"])
def test_retention_bare_and_with_the_method(workdir, method, capsys):
    out = workdir / method
    flags = ["--method", method, "--per_device_train_batch_size", "5"]
    flags += ["--learning_rate", "0.01" if method == "full" else "0.3", "--lr_scheduler_type", "constant"]
    results = main(
        train_args(workdir, out, *flags, *general_set(workdir), steps=60 if method == "full" else 2)
    )
    before, after = results["retention"]["before"], results["retention"]["after"]
    for key in ("heldout-perplexity", "copy-exact", "copy-share", "listing-f1"):
        assert key in before and key in after
    assert (
        before["heldout-perplexity"] != after["heldout-perplexity"]
    )  # the method changes the backbone's text
    answers = [json.loads(line) for line in (out / retention.ANSWERS_FILE).read_text().splitlines()]
    bare = [json.loads(line) for line in (out / "before" / retention.ANSWERS_FILE).read_text().splitlines()]
    assert [a["probe"] for a in answers] == ["copy"] * 3 + ["listing"] * 2 == [a["probe"] for a in bare]
    table = (out / "eval_table.md").read_text()
    assert f"| metric | before (backbone alone) | after ({method}) | change |" in table
    assert "| retention: held-out perplexity (2 texts; lower is better) |" in table
    assert "| retention: 动词 listing F1 (2 sentences) |" in table
    if method == "full":
        # 60 steps on the probes' chats teach them: the answers change and the scores with them. The backbone's
        # scores were taken before training (no bare backbone is left afterwards).
        assert [a["answer"] for a in answers] != [a["answer"] for a in bare]
        assert after["copy-share"] > before["copy-share"] and after["listing-f1"] > before["listing-f1"]
        printed = capsys.readouterr().out
        assert printed.index("[retention before]") < printed.index("checkpoint saved to")
    # evaluate.py scores any checkpoint the same way, against the bare backbone (reloaded for a full checkpoint)
    evaluate_main(
        ["--model", str(workdir / "model"), "--checkpoint", str(out), "--test_file", str(workdir / "train.json"),
         "--output_dir", str(out / "eval"), "--max_samples", "2", "--max_new_tokens", "4", *general_set(workdir)]
    )  # fmt: skip
    scores = json.loads((out / "eval" / "retention.json").read_text())
    for key in ("heldout-perplexity", "copy-share", "listing-f1"):
        assert scores["before"][key] == pytest.approx(before[key], abs=1e-3)
        assert scores["after"][key] == pytest.approx(after[key], abs=1e-3)


def test_a_users_file_is_scored_by_loss_or_perplexity(workdir):
    from ptuning_v2.loading import load_model, load_tokenizer

    tokenizer, model = load_tokenizer(str(workdir / "model")), load_model(str(workdir / "model"))
    pairs = write_jsonl(workdir / "general.jsonl", [{"prompt": "我们去", "response": "北京。"}])
    off = {"retention_heldout_lines": 0, "retention_copy_sentences": 0, "retention_listing_sentences": 0}
    for path, key in ((pairs, "file-loss"), (workdir / "heldout.txt", "file-perplexity")):
        general = retention.RetentionSet(
            retention.RetentionSettings(retention=True, retention_file=str(path), **off), tokenizer
        )
        metrics, answers = general.score(model)
        assert list(general.labels) == [key] and metrics[key] > 0 and answers == []
    # a .txt file is scored as the held-out texts are: the same documents, the same perplexity
    assert metrics["file-perplexity"] == pytest.approx(
        retention.RetentionSet(retention.RetentionSettings(retention=True, retention_heldout_file=str(path),
                                                           **{**off, "retention_heldout_lines": 2}), tokenizer)
        .score(model)[0]["heldout-perplexity"], rel=1e-6
    )  # fmt: skip


@pytest.mark.parametrize(
    ("lines", "reader", "expected"),
    [
        (
            '{"prompt": "a", "response": "b"}\n{"prompt": "a", "response": "b"\n',
            "pairs",
            r"bad.jsonl:2: malformed JSON",
        ),
        ('\n{"prompt": "a"}\n', "pairs", r"bad.jsonl:2: 'response' is missing"),
        ('{"prompt": 3, "response": "b"}\n', "pairs", r"bad.jsonl:1: 'prompt' is a int"),
        ('{"prompt": "a", "response": " "}\n', "pairs", r"bad.jsonl:1: the response is empty"),
        ('["a", "b"]\n', "pairs", r"bad.jsonl:1: expected a JSON object"),
        ("\n\n", "pairs", r"bad.jsonl: no prompt/response pairs"),
        ('{"summary": "a b"}\n{"content": "x"}\n', "copy", r"bad.jsonl:2: no 'summary' string"),
        ('{"words": ["a"], "tags": ["n", "v"]}\n', "tagged", r"bad.jsonl:1: 1 words but 2 tags"),
        ('{"words": ["a"]}\n', "tagged", r"bad.jsonl:1: expected \{"),
        ("\n \n", "text", r"bad.jsonl: no text"),
    ],
)
def test_a_bad_file_is_named_with_its_line(tmp_path, lines, reader, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text(lines, encoding="utf-8")
    read = {
        "pairs": retention.read_pairs,
        "copy": lambda p: retention.read_copy_sentences(p, 10, 60),
        "tagged": read_tagged,
        "text": retention.read_texts,
    }[reader]
    with pytest.raises(ValueError, match=expected):
        read(path)


def test_retention_settings_are_checked_before_loading(workdir, tmp_path, monkeypatch):
    import ptuning_v2.train as train_module

    monkeypatch.setattr(train_module, "load_model", lambda *a, **k: pytest.fail("loaded the model"))
    cases = [
        (("--retention_file", str(tmp_path / "mine.jsonl")), "--retention_file"),
        (("--retention_listing_file", str(tmp_path / "none.json")), "--retention_listing_file"),
        (("--retention_copy_sentences", "-1"), "--retention_copy_sentences -1: must be 0"),
    ]
    for flags, expected in cases:
        with pytest.raises(ValueError, match=expected):
            main(train_args(workdir, tmp_path / "out", *general_set(workdir, *flags), steps=1))
    assert not (tmp_path / "out").exists()
