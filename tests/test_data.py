"""Tests for ptuning_v2.data with tiny character-level tokenizers built on the spot (no downloads)."""

from __future__ import annotations

import json

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from ptuning_v2.data import (
    IGNORE_INDEX,
    DataConfig,
    TokenizeStats,
    load_conversations,
    tokenize_for_generation,
    tokenize_for_training,
    training_collator,
)

SPECIALS = [
    "<unk>",
    "<pad>",
    "<eos>",
    "[gMASK]",
    "sop",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
]
# ChatGLM3 style: [gMASK]sop, then "<|role|>\n" + content per message; the generation prompt is <|assistant|>.
CHATGLM3_TEMPLATE = (
    "[gMASK]sop{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
# Rewrites earlier turns once the conversation grows, so assistant spans cannot be located.
REWRITING_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}{% if loop.last %}.{% endif %}{% endfor %}"
)


def _make_tokenizer(chat_template: str | None) -> PreTrainedTokenizerFast:
    chars = (
        [chr(c) for c in range(32, 127)]
        + ["\n"]
        + [chr(c) for c in range(0x4E00, 0x9FA6)]
        + list("，。：？！；、")
    )
    vocab = {token: i for i, token in enumerate(SPECIALS + [c for c in chars if c not in SPECIALS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")  # one token per char
    tok.decoder = decoders.Fuse()
    tok.add_special_tokens(SPECIALS)
    # ChatGLM2 style: add_special_tokens=True puts [gMASK] sop in front.
    tok.post_processor = processors.TemplateProcessing(
        single="[gMASK] sop $A", special_tokens=[("[gMASK]", vocab["[gMASK]"]), ("sop", vocab["sop"])]
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="<eos>",
        extra_special_tokens=SPECIALS[3:],
    )
    hf.chat_template = chat_template
    return hf


@pytest.fixture(scope="module")
def chat_tok() -> PreTrainedTokenizerFast:
    return _make_tokenizer(CHATGLM3_TEMPLATE)


@pytest.fixture(scope="module")
def plain_tok() -> PreTrainedTokenizerFast:
    return _make_tokenizer(None)


def _write(tmp_path, name: str, rows: list) -> str:
    path = tmp_path / name
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n", encoding="utf-8")
    return str(path)


def _load(tmp_path, rows: list, config: DataConfig | None = None, name: str = "data.jsonl"):
    return load_conversations(
        _write(tmp_path, name, rows), config or DataConfig(), cache_dir=str(tmp_path / "cache")
    )


def _decode(tok, ids) -> str:
    return tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)


def _supervised_runs(tok, labels: list[int]) -> list[str]:
    """Decoded runs of consecutive supervised labels."""
    runs, current = [], []
    for label in labels + [IGNORE_INDEX]:
        if label != IGNORE_INDEX:
            current.append(label)
        elif current:
            runs.append(_decode(tok, current))
            current = []
    return runs


def _prompt_len(labels: list[int]) -> int:
    return next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)


# ------------------------------------------------------------------------------------------- loading


def test_columns_format_normalises(tmp_path):
    ds = _load(
        tmp_path, [{"content": "类型#裙", "summary": "好看的裙子"}, {"content": "问", "summary": "答"}]
    )
    assert ds.column_names == ["messages"]
    assert ds[0]["messages"] == [
        {"role": "user", "content": "类型#裙"},
        {"role": "assistant", "content": "好看的裙子"},
    ]
    assert len(ds) == 2


def test_history_column_and_source_prefix(tmp_path):
    config = DataConfig(prompt_column="q", response_column="a", history_column="h", source_prefix="请回答：")
    rows = [
        {"q": "第二问", "a": "第二答", "h": [["第一问", "第一答"]]},
        {"q": "只一问", "a": "只一答", "h": None},
    ]
    ds = _load(tmp_path, rows, config)
    assert ds[0]["messages"] == [
        {"role": "user", "content": "第一问"},
        {"role": "assistant", "content": "第一答"},
        {"role": "user", "content": "请回答：第二问"},  # prefix on the last prompt only
        {"role": "assistant", "content": "第二答"},
    ]
    assert [m["content"] for m in ds[1]["messages"]] == ["请回答：只一问", "只一答"]


def test_chatglm3_conversations_format(tmp_path):
    turns = [
        {"role": "system", "content": "你是助手"},
        {"role": "user", "content": "天气"},
        {"role": "assistant", "content": "查询"},
        {"role": "observation", "content": "晴"},
        {"role": "assistant", "content": "晴天", "metadata": "ignored"},
    ]
    ds = _load(tmp_path, [{"conversations": turns}])
    assert ds[0]["messages"] == [{"role": t["role"], "content": t["content"]} for t in turns]


def test_glm4_messages_format(tmp_path):
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"}]
    ds = _load(tmp_path, [{"messages": messages}])
    assert ds[0]["messages"] == messages


def test_json_list_file_and_its_line_numbers(tmp_path):
    path = tmp_path / "data.json"
    path.write_text('[\n  {"content": "一", "summary": "二"},\n  {"content": "三"}\n]\n', encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}:3: missing column 'summary'"):
        load_conversations(str(path), DataConfig(), cache_dir=str(tmp_path / "cache"))
    path.write_text(
        '[{"content": "一", "summary": "二"},\n {"content": "三", "summary": "四"}]', encoding="utf-8"
    )
    ds = load_conversations(str(path), DataConfig(), cache_dir=str(tmp_path / "cache"))
    assert [m[1]["content"] for m in ds["messages"]] == ["二", "四"]


def test_cache_follows_file_content(tmp_path):
    path = _write(tmp_path, "data.jsonl", [{"content": "问", "summary": "旧"}])
    assert load_conversations(path, DataConfig(), str(tmp_path / "c"))[0]["messages"][1]["content"] == "旧"
    assert load_conversations(path, DataConfig(), str(tmp_path / "c"))[0]["messages"][1]["content"] == "旧"
    _write(tmp_path, "data.jsonl", [{"content": "问", "summary": "新"}])
    assert load_conversations(path, DataConfig(), str(tmp_path / "c"))[0]["messages"][1]["content"] == "新"


GOOD = '{"content": "问", "summary": "答"}'


@pytest.mark.parametrize(
    "lines, expected",
    [
        ([GOOD, '{"content": "问", "summary": }'], [":2: malformed JSON: Expecting value"]),
        ([GOOD, "", '{"content": "问"}'], [":3: missing column 'summary'", "available columns: ['content']"]),
        (['{"content": 1, "summary": "答"}'], [":1: field 'content' must be a string, got int"]),
        ([GOOD, "[1, 2]"], [":2: expected a JSON object"]),
        (
            ['{"messages": [{"role": "user", "content": "问"}, {"role": "assistant", "content": ["x"]}]}'],
            [":1: field 'messages[1].content' must be a string, got list"],
        ),
        (
            ['{"messages": [{"role": "user", "content": "问"}]}'],
            [":1: field 'messages' has no assistant turn"],
        ),
        (
            ['{"messages": [{"role": "user", "content": "问"}]}', '{"content": "问", "summary": "答"}'],
            [":1: field 'messages' has no assistant turn"],
        ),
        (
            ['{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}', GOOD],
            [":2: missing column 'messages'", "available columns: ['content', 'summary']"],
        ),
        (
            ['{"conversations": [{"role": "human", "content": "a"}, {"role": "assistant", "content": "b"}]}'],
            [":1: field 'conversations[0].role' is 'human'"],
        ),
        (
            [
                '{"conversations": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}, '
                '{"role": "user", "content": "c"}]}'
            ],
            [":1: field 'messages' ends with a 'user' turn"],
        ),
    ],
)
def test_bad_lines_name_file_line_and_field(tmp_path, lines, expected):
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ValueError) as info:
        load_conversations(str(path), DataConfig(), cache_dir=str(tmp_path / "cache"))
    location_and_problem, *details = expected
    assert f"{path}{location_and_problem}" in str(info.value), str(info.value)
    for fragment in details:
        assert fragment in str(info.value), str(info.value)


@pytest.mark.parametrize(
    "history, item",
    [
        ("不是列表", "got str"),
        ([["只有问"]], "item 0"),
        ([["问", 2]], "item 0"),
        ([["a", "b"], "x"], "item 1"),
    ],
)
def test_bad_history_names_the_field(tmp_path, history, item):
    path = _write(tmp_path, "h.jsonl", [{"content": "问", "summary": "答", "hist": history}])
    with pytest.raises(
        ValueError, match=rf"{path}:1: field 'hist' must be a list of \[query, answer\] pairs.*{item}"
    ):
        load_conversations(path, DataConfig(history_column="hist"), cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize("content", ["", "\n\n  \n"])
def test_empty_file_is_named(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=rf"{path}: no examples"):
        load_conversations(str(path), DataConfig(), cache_dir=str(tmp_path / "cache"))


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="data file not found: .*nope.jsonl"):
        load_conversations(str(tmp_path / "nope.jsonl"), DataConfig())


# ---------------------------------------------------------------------------------------- tokenizing


def test_template_labels_cover_only_the_response(tmp_path, chat_tok):
    ds = _load(tmp_path, [{"content": "你好吗", "summary": "很好"}])
    train, stats = tokenize_for_training(ds, chat_tok, DataConfig())
    row = train[0]
    assert set(row) == {"input_ids", "labels"}
    n = _prompt_len(row["labels"])
    assert _decode(chat_tok, row["input_ids"][:n]) == "[gMASK]sop<|user|>\n你好吗<|assistant|>"
    assert row["labels"][:n] == [IGNORE_INDEX] * n
    assert row["labels"][n:] == row["input_ids"][n:]
    assert _decode(chat_tok, row["labels"][n:]) == "\n很好<eos>"
    assert stats == TokenizeStats(examples=1)


def test_plain_format_labels_and_prompt(tmp_path, plain_tok):
    ds = _load(tmp_path, [{"content": "你好吗", "summary": "很好"}])
    train, _ = tokenize_for_training(ds, plain_tok, DataConfig())
    row = train[0]
    n = _prompt_len(row["labels"])
    assert _decode(plain_tok, row["input_ids"][:n]) == "[gMASK]sop[Round 1]\n\n问：你好吗\n\n答："
    assert row["labels"][:n] == [IGNORE_INDEX] * n
    assert _decode(plain_tok, row["labels"][n:]) == "很好<eos>"


def test_multi_turn_template_supervises_every_assistant_turn(tmp_path, chat_tok):
    turns = [
        {"role": "system", "content": "助手"},
        {"role": "user", "content": "问一"},
        {"role": "assistant", "content": "答一"},
        {"role": "user", "content": "问二"},
        {"role": "observation", "content": "观察"},
        {"role": "assistant", "content": "答二"},
    ]
    train, _ = tokenize_for_training(_load(tmp_path, [{"messages": turns}]), chat_tok, DataConfig())
    row = train[0]
    assert _decode(chat_tok, row["input_ids"]) == (
        "[gMASK]sop<|system|>\n助手<|user|>\n问一<|assistant|>\n答一<|user|>\n问二<|observation|>\n观察"
        "<|assistant|>\n答二<eos>"
    )
    assert _supervised_runs(chat_tok, row["labels"]) == ["\n答一", "\n答二<eos>"]


def test_multi_turn_plain_from_history_column(tmp_path, plain_tok):
    config = DataConfig(history_column="history")
    rows = [{"content": "问二", "summary": "答二", "history": [["问一", "答一"]]}]
    train, _ = tokenize_for_training(_load(tmp_path, rows, config), plain_tok, config)
    row = train[0]
    assert _decode(plain_tok, row["input_ids"]) == (
        "[gMASK]sop[Round 1]\n\n问：问一\n\n答：答一\n\n[Round 2]\n\n问：问二\n\n答：答二<eos>"
    )
    assert _supervised_runs(plain_tok, row["labels"]) == ["答一", "答二<eos>"]


def test_truncation_keeps_prompt_end_and_response_start(tmp_path, plain_tok):
    long_query = "一二三四五六七八九十" * 2
    rows = [{"content": long_query, "summary": "甲乙丙丁戊"}, {"content": "短", "summary": "短"}]
    config = DataConfig(max_source_length=22, max_target_length=3)
    train, stats = tokenize_for_training(_load(tmp_path, rows, config), plain_tok, config)
    row = train[0]
    n = _prompt_len(row["labels"])
    assert n == 22
    # [gMASK] sop stay at the start, then the last 20 prompt tokens: the question's end and the cue.
    assert _decode(plain_tok, row["input_ids"][:n]) == "[gMASK]sop五六七八九十一二三四五六七八九十\n\n答："
    assert _decode(plain_tok, row["labels"][n:]) == "甲乙丙<eos>"
    assert (stats.examples, stats.truncated_prompts, stats.truncated_responses) == (2, 1, 1)
    assert "truncated 1 prompts" in stats.summary()


def test_empty_response_dropped_and_counted(tmp_path, chat_tok):
    rows = [
        {"content": "问", "summary": ""},
        {"content": "问", "summary": "答"},
        {"content": "问", "summary": "  "},
    ]
    train, stats = tokenize_for_training(_load(tmp_path, rows), chat_tok, DataConfig())
    assert len(train) == 1
    assert (stats.examples, stats.dropped_empty, stats.kept) == (3, 2, 1)
    assert "dropped 2 with an empty response" in stats.summary()


def test_all_dropped_is_an_error(tmp_path, chat_tok):
    with pytest.raises(ValueError, match="every example was dropped"):
        tokenize_for_training(_load(tmp_path, [{"content": "问", "summary": ""}]), chat_tok, DataConfig())


def test_rewriting_template_is_rejected(tmp_path):
    tok = _make_tokenizer(REWRITING_TEMPLATE)
    ds = _load(tmp_path, [{"content": "问", "summary": "答"}])
    with pytest.raises(ValueError, match="chat template is not append-only"):
        tokenize_for_training(ds, tok, DataConfig())


def test_plain_format_rejects_other_roles(tmp_path, plain_tok):
    turns = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "a"},
    ]
    with pytest.raises(ValueError, match="plain prompt format"):
        tokenize_for_training(_load(tmp_path, [{"messages": turns}]), plain_tok, DataConfig())


def test_collator_pads_dynamically(tmp_path, chat_tok):
    rows = [{"content": "问", "summary": "答"}, {"content": "长一些的问题", "summary": "长一些的回答"}]
    train, _ = tokenize_for_training(_load(tmp_path, rows), chat_tok, DataConfig())
    short, long = len(train[0]["input_ids"]), len(train[1]["input_ids"])
    batch = training_collator(chat_tok)([train[0], train[1]])
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (2, long)
    assert batch["input_ids"][0, short:].tolist() == [chat_tok.pad_token_id] * (long - short)
    assert batch["labels"][0, short:].tolist() == [IGNORE_INDEX] * (long - short)
    assert batch["attention_mask"].sum(dim=1).tolist() == [short, long]
    assert batch["labels"][1].tolist() == train[1]["labels"]


@pytest.mark.parametrize("template", [True, False])
def test_generation_prompt_matches_training(tmp_path, chat_tok, plain_tok, template):
    tok = chat_tok if template else plain_tok
    config = DataConfig(history_column="history", max_source_length=20)
    rows = [{"content": "问二", "summary": "答二", "history": [["问一", "答一"]]}]
    ds = _load(tmp_path, rows, config)
    gen = tokenize_for_generation(ds, tok, config)
    train, _ = tokenize_for_training(ds, tok, config)
    row = gen[0]
    assert row["label_text"] == "答二"
    assert len(row["input_ids"]) <= 20 and row["attention_mask"] == [1] * len(row["input_ids"])
    expected_end = "<|assistant|>" if template else "问二\n\n答："
    assert _decode(tok, row["input_ids"]).endswith(expected_end)
    assert row["input_ids"] == train[0]["input_ids"][: len(row["input_ids"])]
