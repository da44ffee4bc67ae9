"""Tiny randomly initialised decoders for the tests: GLM, GLM-4, Qwen2 (GQA) and Llama with one kv head (MQA)."""

from __future__ import annotations

import torch
from transformers import (
    Glm4Config,
    Glm4ForCausalLM,
    GlmConfig,
    GlmForCausalLM,
    GlmForSequenceClassification,
    GlmForTokenClassification,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

VOCAB = 96
PAD, EOS, BOS = 0, 1, 2
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    head_dim=8,
    pad_token_id=PAD,
    eos_token_id=EOS,
    bos_token_id=BOS,
    max_position_embeddings=256,
)

CONFIGS = {
    "glm": (GlmConfig, GlmForCausalLM, dict(num_key_value_heads=2)),
    "glm4": (Glm4Config, Glm4ForCausalLM, dict(num_key_value_heads=2)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, dict(num_key_value_heads=2)),
    "llama_mqa": (LlamaConfig, LlamaForCausalLM, dict(num_key_value_heads=1)),
}


def tiny_config(kind: str = "glm", **overrides):
    config_class, _, extra = CONFIGS[kind]
    return config_class(**{**_COMMON, **extra, **overrides})


def tiny_model(kind: str = "glm", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    torch.manual_seed(seed)
    _, model_class, _ = CONFIGS[kind]
    model = model_class(tiny_config(kind, **overrides)).to(dtype)
    return model.eval()


def tiny_classifier(task: str = "sequence", num_labels: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    model_class = GlmForSequenceClassification if task == "sequence" else GlmForTokenClassification
    return model_class(tiny_config("glm", num_labels=num_labels)).eval()


def random_ids(batch: int, length: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, VOCAB, (batch, length), generator=generator)


CHAT_SPECIALS = [
    "<unk>",
    "<pad>",
    "</s>",
    "[gMASK]",
    "sop",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|observation|>",
]
CHATGLM3_TEMPLATE = (
    "[gMASK]sop{% for message in messages %}<|{{ message['role'] }}|>\n {{ message['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def char_tokenizer(texts: list[str], chat_template: str | None = CHATGLM3_TEMPLATE):
    """A character-level tokenizer over the characters of ``texts`` with ChatGLM3-style special tokens."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    chars = sorted({c for text in texts for c in text} | {chr(c) for c in range(32, 127)} | {"\n"})
    vocab = {token: i for i, token in enumerate(CHAT_SPECIALS + [c for c in chars if c not in CHAT_SPECIALS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(CHAT_SPECIALS)
    backend.post_processor = processors.TemplateProcessing(
        single="[gMASK] sop $A", special_tokens=[("[gMASK]", vocab["[gMASK]"]), ("sop", vocab["sop"])]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        eos_token="</s>",
        extra_special_tokens=CHAT_SPECIALS[3:],
        padding_side="left",
    )
    tokenizer.chat_template = chat_template
    return tokenizer


def save_tiny_backbone(directory, texts: list[str], kind: str = "glm", seed: int = 0, **overrides):
    """A tiny random model + char tokenizer saved like a real checkpoint, for the entry points' tests."""
    tokenizer = char_tokenizer(texts)
    model = tiny_model(
        kind,
        seed=seed,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        **overrides,
    )
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
