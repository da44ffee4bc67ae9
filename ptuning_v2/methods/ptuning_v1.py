"""P-Tuning (v1, "GPT Understands, Too"): virtual tokens at the input, produced by a prompt encoder.

The encoder reparameterises ``pre_seq_len`` embeddings through a bidirectional LSTM and an MLP (or the MLP alone),
which the paper found trains more stably than free embeddings. Only the input layer is prompted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .virtual_tokens import VirtualTokenMethod

ENCODER_TYPES = ("lstm", "mlp")


@dataclass
class PTuningV1Config:
    pre_seq_len: int = 128
    prompt_encoder_type: str = "lstm"  # lstm (bidirectional LSTM + MLP, as in the paper) or mlp
    prompt_encoder_hidden_size: int | None = None  # default: the backbone's hidden size

    def __post_init__(self) -> None:
        if self.pre_seq_len < 1:
            raise ValueError(f"pre_seq_len must be at least 1, got {self.pre_seq_len}")
        if self.prompt_encoder_type not in ENCODER_TYPES:
            raise ValueError(
                f"prompt_encoder_type must be one of {ENCODER_TYPES}, got {self.prompt_encoder_type!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PromptEncoder(nn.Module):
    """``pre_seq_len`` embeddings -> [BiLSTM] -> Linear -> ReLU -> Linear, to the backbone's hidden size."""

    def __init__(self, config: PTuningV1Config, hidden_size: int) -> None:
        super().__init__()
        self.config = config
        width = config.prompt_encoder_hidden_size or hidden_size
        self.embedding = nn.Embedding(config.pre_seq_len, hidden_size)
        if config.prompt_encoder_type == "lstm":
            self.lstm = nn.LSTM(hidden_size, width // 2, num_layers=2, bidirectional=True, batch_first=True)
            mlp_in = 2 * (width // 2)
        else:
            mlp_in = hidden_size
        self.mlp = nn.Sequential(nn.Linear(mlp_in, width), nn.ReLU(), nn.Linear(width, hidden_size))

    def forward(self) -> torch.Tensor:
        positions = torch.arange(self.config.pre_seq_len, device=self.embedding.weight.device)
        hidden = self.embedding(positions)
        if self.config.prompt_encoder_type == "lstm":
            hidden = self.lstm(hidden[None])[0][0]
        return self.mlp(hidden)


class PTuningV1(VirtualTokenMethod):
    name = "ptuning_v1"
    config_class = PTuningV1Config

    @classmethod
    def build_encoder(cls, model: nn.Module, config: PTuningV1Config, tokenizer: Any = None) -> nn.Module:
        return PromptEncoder(config, model.get_input_embeddings().weight.shape[1])
