"""The committed backbone models/glm-zh-tiny loads offline with plain transformers Auto classes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sentencepiece as spm
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from ptuning_v2.tokenization import CHATGLM_SPECIAL_TOKENS, chat_template_ids, chatglm3_message_ids

MODEL_DIR = Path(__file__).resolve().parents[1] / "models" / "glm-zh-tiny"
TEXTS = [
    "中共中央总书记、国家主席江泽民发表新年讲话。",
    "这本书的内容很丰富，推荐购买！",
    "１９９８年１月１日，北京 Beijing 晴。",
]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(MODEL_DIR)


@pytest.fixture(scope="module")
def model():
    return AutoModelForCausalLM.from_pretrained(MODEL_DIR)


def test_files_present_and_small() -> None:
    for name in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "README.md"):
        assert (MODEL_DIR / name).is_file(), name
    assert (MODEL_DIR / "model.safetensors").stat().st_size <= 30 * 2**20
    metrics = json.loads((MODEL_DIR / "pretrain_metrics.json").read_text(encoding="utf-8"))
    assert metrics["heldout"]["perplexity"] < metrics["heldout"]["unigram_perplexity"]


def test_model_is_native_glm_with_gqa(model, tokenizer) -> None:
    cfg = model.config
    assert cfg.model_type == "glm" and type(model).__name__ == "GlmForCausalLM"
    assert cfg.num_key_value_heads == 2 and cfg.num_attention_heads > cfg.num_key_value_heads
    assert cfg.vocab_size == len(tokenizer)
    assert (cfg.pad_token_id, cfg.eos_token_id) == (tokenizer.pad_token_id, tokenizer.eos_token_id)
    ids = tokenizer(TEXTS[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        logits = model(**ids).logits
    assert logits.shape[-1] == len(tokenizer) and torch.isfinite(logits).all()


def test_tokenizer_round_trip_and_special_tokens(tokenizer) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(MODEL_DIR / "sentencepiece.model"))
    n = sp.vocab_size()
    assert [tokenizer.convert_tokens_to_ids(t) for t in CHATGLM_SPECIAL_TOKENS] == list(range(n, n + 9))
    gmask_sop = tokenizer.convert_tokens_to_ids(["[gMASK]", "sop"])
    for text in TEXTS:
        ids = tokenizer.encode(text)
        assert ids == gmask_sop + sp.encode(text)
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    for token in CHATGLM_SPECIAL_TOKENS:
        assert tokenizer.tokenize(token) == [token]
    # One piece per character, so an entity is always a run of whole tokens that the model can copy
    # (``▁`` is SentencePiece's word start).
    assert [t for t in tokenizer.tokenize(TEXTS[0]) if t != "▁"] == list(TEXTS[0])
    messages = [
        {"role": "system", "content": "你是一个助手。"},
        {"role": "user", "content": TEXTS[0]},
        {"role": "assistant", "content": TEXTS[1]},
        {"role": "user", "content": TEXTS[2]},
    ]
    assert chat_template_ids(tokenizer, messages, True) == chatglm3_message_ids(sp, messages, True)


def test_loads_through_load_model_with_a_prefix(tmp_path) -> None:
    from ptuning_v2 import PrefixConfig, attach_prefix, load_model, load_tokenizer

    model = load_model(str(MODEL_DIR))
    assert not any(p.requires_grad for p in model.parameters())
    attach_prefix(model, PrefixConfig(pre_seq_len=4))
    model.tuning.save(tmp_path)
    reloaded = load_model(str(MODEL_DIR), ptuning_checkpoint=str(tmp_path))
    cfg = reloaded.config
    assert (
        reloaded.tuning.encoder.kv_shape.kv_size
        == cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * cfg.head_dim
    )
    tokenizer = load_tokenizer(str(MODEL_DIR))
    assert tokenizer.padding_side == "left"
    ids = tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(reloaded(**ids).logits).all()
