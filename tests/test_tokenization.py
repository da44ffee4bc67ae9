"""The fast ChatGLM3 tokenizer must reproduce SentencePiece + ChatGLM3's conventions id for id."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import sentencepiece as spm
from transformers import AutoTokenizer

from ptuning_v2.tokenization import (
    CHATGLM_SPECIAL_TOKENS,
    build_chatglm_tokenizer,
    chat_template_ids,
    chatglm3_message_ids,
)

CHINESE = [
    "今天天气很好，我们一起去公园散步吧！",
    "这本书的内容很丰富，作者写得非常用心。",
    "快递太慢了，等了一个星期才收到货。",
    "北京是中华人民共和国的首都。",
    "手机屏幕很清晰，电池也很耐用，性价比高。",
    "酒店的服务态度不好，房间也不干净。",
    "他在会议上介绍了经济发展的新情况。",
    "我们要坚持改革开放，推动社会全面进步。",
]
ASCII = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world, this is line number {i}.",
    "Prices rose by {i} percent in 1998.",
]
# Start/end spaces, tabs, newlines, emoji and rare characters exercise the dummy prefix and byte fallback.
EDGE_TEXTS = [
    "",
    " ",
    "\n",
    "  前面有两个空格",
    "\n换行开头",
    "结尾有空格 ",
    "中间  两个空格\t制表符\n换行",
    "生僻字𠀀和表情😀",
    "mixed 中文 and English 123",
    "people Aesop desktop",
]


def _corpus() -> list[str]:
    rng = random.Random(0)
    lines = []
    for i in range(400):
        a, b = rng.sample(CHINESE, 2)
        lines.append(a + b if i % 2 else a)
        lines.append(rng.choice(ASCII).format(i=i))
    return lines


@pytest.fixture(scope="module", params=["chatglm_like", "nmt_nfkc"])
def sp_model(request, tmp_path_factory) -> str:
    """A tiny SentencePiece model: ChatGLM3-like (identity, keep spaces, byte fallback) or sp defaults."""
    root = tmp_path_factory.mktemp(request.param)
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(_corpus()), encoding="utf-8")
    options = {"chatglm_like": dict(normalization_rule_name="identity", remove_extra_whitespaces=False,
                                    byte_fallback=True),
               "nmt_nfkc": {}}[request.param]  # fmt: skip
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(root / "sp"),
        vocab_size=600,
        hard_vocab_limit=False,
        character_coverage=1.0,
        minloglevel=2,
        **options,
    )
    return str(root / "sp.model")


def _texts() -> list[str]:
    rng = random.Random(1)
    texts = CHINESE + [t.format(i=7) for t in ASCII] + EDGE_TEXTS
    for _ in range(100):  # random splices: word starts at odd places, whitespace runs
        a, b = rng.sample(texts, 2)
        texts.append(a[: rng.randint(0, len(a))] + rng.choice(["", " ", "  ", "\n", " \n"]) + b)
    return texts


def test_special_token_ids(sp_model: str) -> None:
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    tok = build_chatglm_tokenizer(sp_model)
    n = sp.vocab_size()
    assert [tok.convert_tokens_to_ids(t) for t in CHATGLM_SPECIAL_TOKENS] == list(range(n, n + 9))
    assert len(tok) == n + 9
    assert tok.eos_token_id == sp.eos_id()
    assert tok.pad_token_id == sp.unk_id()
    assert tok.padding_side == "left"
    assert [tok.convert_ids_to_tokens(i) for i in range(n)] == [sp.id_to_piece(i) for i in range(n)]


def test_encode_matches_sentencepiece(sp_model: str) -> None:
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    tok = build_chatglm_tokenizer(sp_model)
    prefix = tok.convert_tokens_to_ids(["[gMASK]", "sop"])
    for text in _texts():
        assert tok.encode(text, add_special_tokens=False) == sp.encode(text), repr(text)
        assert tok(text).input_ids == prefix + sp.encode(text), repr(text)


def test_round_trip(sp_model: str) -> None:
    tok = build_chatglm_tokenizer(sp_model)
    texts = ["今天天气很好 我们一起去公园散步吧", "Hello world, this is line number 7."]
    if "chatglm_like" in sp_model:  # identity normalisation + byte fallback: everything survives
        texts += CHINESE + ["混合 text 与 English。", "生僻字𠀀和表情😀", "  两个空格开头\n第二行"]
    for text in texts:
        assert tok.decode(tok.encode(text), skip_special_tokens=True) == text


def test_special_tokens_are_atomic(sp_model: str) -> None:
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    tok = build_chatglm_tokenizer(sp_model)
    for token in CHATGLM_SPECIAL_TOKENS:
        assert tok.tokenize(token) == [token]
        # Punctuation around it: "sop"/"eop" only match as whole words (checked below).
        ids = tok.encode(f"今天。{token}。天气", add_special_tokens=False)
        # Each side of a special token is encoded on its own, like ChatGLM3's encode_special_tokens.
        assert ids == sp.encode("今天。") + [tok.convert_tokens_to_ids(token)] + sp.encode("。天气")
    # "sop"/"eop" are whole-word tokens, so ordinary English words containing them are untouched.
    for word in ("people", "Aesop", "desktop"):
        assert tok.encode(word, add_special_tokens=False) == sp.encode(word)


CONVERSATIONS = [
    [{"role": "user", "content": "你好"}],
    [
        {"role": "system", "content": "你是一个乐于助人的助手。"},
        {"role": "user", "content": "北京是哪个国家的首都？"},
        {"role": "assistant", "content": "北京是中华人民共和国的首都。"},
        {"role": "user", "content": "  前面有空格\n还有换行"},
    ],
    [
        {"role": "system", "content": "Answer briefly."},
        {"role": "user", "content": "mixed 中文 and English 123"},
        {"role": "assistant", "metadata": "weather", "content": "查询天气"},
        {"role": "observation", "content": "晴，25度"},
        {"role": "assistant", "content": ""},
    ],
]


@pytest.mark.parametrize("generation_prompt", [True, False])
def test_chat_template_matches_reference(sp_model: str, generation_prompt: bool) -> None:
    sp = spm.SentencePieceProcessor(model_file=sp_model)
    tok = build_chatglm_tokenizer(sp_model)
    for messages in CONVERSATIONS:
        expected = chatglm3_message_ids(sp, messages, generation_prompt)
        assert chat_template_ids(tok, messages, generation_prompt) == expected
        assert chatglm3_message_ids(tok, messages, generation_prompt) == expected


def test_save_and_reload(sp_model: str, tmp_path: Path) -> None:
    tok = build_chatglm_tokenizer(sp_model)
    tok.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in _texts() + ["今天<|user|>天气", "people sop eop"]:
        assert reloaded.encode(text) == tok.encode(text), repr(text)
    for messages in CONVERSATIONS:
        assert chat_template_ids(reloaded, messages, True) == chat_template_ids(tok, messages, True)
    assert (reloaded.eos_token, reloaded.pad_token, reloaded.padding_side) == ("</s>", "<unk>", "left")


def test_left_padding(sp_model: str) -> None:
    tok = build_chatglm_tokenizer(sp_model)
    batch = tok(["你好", "今天天气很好，我们一起去公园散步吧！"], padding=True)
    short, long = batch.input_ids
    assert len(short) == len(long)
    n_pad = len(long) - len(tok.encode("你好"))
    assert short[:n_pad] == [tok.pad_token_id] * n_pad
    assert batch.attention_mask[0] == [0] * n_pad + [1] * (len(short) - n_pad)
