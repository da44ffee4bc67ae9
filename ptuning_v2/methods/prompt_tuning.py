"""Prompt Tuning (Lester et al. 2021): ``pre_seq_len`` free embeddings in front of the input, nothing else.

Initialised randomly (at the scale of the backbone's own token embeddings), from embeddings of tokens sampled from
the vocabulary, or from the embeddings of a text (``prompt_init_text``, repeated or cut to ``pre_seq_len`` tokens).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .virtual_tokens import VirtualTokenMethod

INIT_CHOICES = ("random", "vocab", "text")


@dataclass
class PromptTuningConfig:
    pre_seq_len: int = 128
    prompt_init: str = "vocab"  # random, vocab (sampled token embeddings) or text
    prompt_init_text: str | None = None

    def __post_init__(self) -> None:
        if self.pre_seq_len < 1:
            raise ValueError(f"pre_seq_len must be at least 1, got {self.pre_seq_len}")
        if self.prompt_init not in INIT_CHOICES:
            raise ValueError(f"prompt_init must be one of {INIT_CHOICES}, got {self.prompt_init!r}")
        if self.prompt_init == "text" and not self.prompt_init_text:
            raise ValueError("prompt_init text needs prompt_init_text (PROMPT_INIT_TEXT)")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PromptTable(nn.Module):
    def __init__(self, config: PromptTuningConfig, hidden_size: int) -> None:
        super().__init__()
        self.config = config
        self.embedding = nn.Embedding(config.pre_seq_len, hidden_size)

    def forward(self) -> torch.Tensor:
        return self.embedding.weight


def _init_ids(config: PromptTuningConfig, vocab_size: int, tokenizer: Any) -> torch.Tensor | None:
    if config.prompt_init == "vocab" or (config.prompt_init == "text" and tokenizer is None):
        # Without the tokenizer (a checkpoint being loaded, whose tensors replace these) the text cannot be read.
        return torch.randint(0, vocab_size, (config.pre_seq_len,))
    if config.prompt_init == "text":
        ids = tokenizer(config.prompt_init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ValueError(f"prompt_init_text {config.prompt_init_text!r} tokenizes to no tokens")
        repeats = -(-config.pre_seq_len // len(ids))
        return torch.tensor((ids * repeats)[: config.pre_seq_len])
    return None


class PromptTuning(VirtualTokenMethod):
    name = "prompt_tuning"
    config_class = PromptTuningConfig

    @classmethod
    def build_encoder(cls, model: nn.Module, config: PromptTuningConfig, tokenizer: Any = None) -> nn.Module:
        token_embeddings = model.get_input_embeddings().weight
        table = PromptTable(config, token_embeddings.shape[1])
        with torch.no_grad():
            table.embedding.weight.copy_(initial_prompt(token_embeddings, config, tokenizer))
        return table


def initial_prompt(token_embeddings: torch.Tensor, config: Any, tokenizer: Any = None) -> torch.Tensor:
    """``(pre_seq_len, hidden_size)`` starting embeddings as ``config.prompt_init`` says; ``tokenizer`` (the
    model's) reads ``prompt_init_text``."""
    ids = _init_ids(config, token_embeddings.shape[0], tokenizer)
    if ids is None:  # random, at the scale of the backbone's own embeddings (nn.Embedding's N(0, 1) is not)
        scale = float(token_embeddings.float().std())
        return torch.empty(config.pre_seq_len, token_embeddings.shape[1]).normal_(0.0, scale)
    return token_embeddings[ids.to(token_embeddings.device)].float()
