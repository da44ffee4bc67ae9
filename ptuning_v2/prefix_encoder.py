"""The prefix: a trainable key/value table per layer, laid out exactly as THUDM's ChatGLM2/3 code lays it out.

P-Tuning v2 (``prefix_projection=False``) learns the table directly: ``Embedding(pre_seq_len, kv_size)``.
Prefix-Tuning (``prefix_projection=True``) reparameterises it through a 2-layer MLP,
``Embedding(pre_seq_len, kv_size) -> Linear(kv_size, h) -> Tanh -> Linear(h, kv_size)``, which trains more stably.

``kv_size = num_layers * 2 * num_kv_heads * head_dim``. A row of the table, viewed as
``(2 * num_layers, num_kv_heads, head_dim)``, holds layer i's key in slot ``2i`` and its value in slot ``2i + 1``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

PositionConvention = Literal["chatglm", "peft"]


@dataclass
class PrefixConfig:
    """How the prefix is built and fed to the model.

    position_convention: ``"chatglm"`` gives real tokens positions starting at 0, as THUDM's ChatGLM code does (the
    prefix keys carry no rotation), so prefixes trained there reproduce. ``"peft"`` starts them at ``pre_seq_len``,
    as HF PEFT does.
    """

    pre_seq_len: int = 128
    prefix_projection: bool = False
    prefix_hidden_size: int | None = None  # None: the model's hidden size, as in ChatGLM
    prefix_dropout: float = 0.1  # ChatGLM2/3 apply Dropout(0.1) to the prefix
    position_convention: PositionConvention = "chatglm"

    def __post_init__(self) -> None:
        if not isinstance(self.pre_seq_len, int) or self.pre_seq_len < 1:
            raise ValueError(f"pre_seq_len must be a positive integer, got {self.pre_seq_len!r}")
        if not 0.0 <= self.prefix_dropout < 1.0:
            raise ValueError(f"prefix_dropout must be in [0, 1), got {self.prefix_dropout!r}")
        if self.position_convention not in ("chatglm", "peft"):
            raise ValueError(
                f"position_convention must be 'chatglm' or 'peft', got {self.position_convention!r}"
            )
        if self.prefix_hidden_size is not None and self.prefix_hidden_size < 1:
            raise ValueError(f"prefix_hidden_size must be positive, got {self.prefix_hidden_size!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class KVShape:
    """The attention geometry a prefix is built for."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    hidden_size: int

    @property
    def kv_size(self) -> int:
        return self.num_layers * 2 * self.num_kv_heads * self.head_dim

    @property
    def geometry(self) -> tuple[int, int, int]:
        """What the table's layout depends on (the hidden size only sizes the projection MLP)."""
        return (self.num_layers, self.num_kv_heads, self.head_dim)

    def describe(self) -> str:
        return (
            f"kv_size={self.kv_size} (num_layers={self.num_layers}, num_kv_heads={self.num_kv_heads}, "
            f"head_dim={self.head_dim})"
        )


def _first(config: Any, *names: str) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def kv_shape_from_config(config: Any) -> KVShape:
    """Read the kv geometry from a ChatGLM config or any transformers decoder config (MHA, GQA or MQA)."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    num_layers = _first(config, "num_layers", "num_hidden_layers", "n_layer")
    hidden_size = _first(config, "hidden_size", "n_embd", "d_model")
    num_heads = _first(config, "num_attention_heads", "n_head")
    if num_layers is None or hidden_size is None or num_heads is None:
        raise ValueError(
            f"cannot read the attention geometry of {type(config).__name__}: need num_layers/num_hidden_layers, "
            "hidden_size and num_attention_heads"
        )
    if getattr(config, "model_type", None) == "chatglm":
        groups = (
            config.multi_query_group_num if getattr(config, "multi_query_attention", False) else num_heads
        )
        head_dim = _first(config, "kv_channels") or hidden_size // num_heads
        return KVShape(num_layers, groups, head_dim, hidden_size)
    num_kv_heads = _first(config, "num_key_value_heads", "multi_query_group_num") or num_heads
    head_dim = _first(config, "head_dim", "kv_channels") or hidden_size // num_heads
    return KVShape(num_layers, num_kv_heads, head_dim, hidden_size)


class PrefixEncoder(nn.Module):
    """Computes the ``(pre_seq_len, kv_size)`` prefix table; parameter names match ChatGLM's checkpoints."""

    def __init__(self, config: PrefixConfig, kv_shape: KVShape) -> None:
        super().__init__()
        self.config = config
        self.kv_shape = kv_shape
        kv_size = kv_shape.kv_size
        self.embedding = nn.Embedding(config.pre_seq_len, kv_size)
        if config.prefix_projection:
            hidden = config.prefix_hidden_size or kv_shape.hidden_size
            self.trans = nn.Sequential(nn.Linear(kv_size, hidden), nn.Tanh(), nn.Linear(hidden, kv_size))
        self.dropout = nn.Dropout(config.prefix_dropout)

    def table(self) -> torch.Tensor:
        """The prefix table ``(pre_seq_len, kv_size)``, computed once however large the batch."""
        # Through the submodules' forward, not `.weight`: DeepSpeed ZeRO-3 gathers partitioned
        # parameters in module hooks.
        positions = torch.arange(self.config.pre_seq_len, device=self.embedding.weight.device)
        table = self.embedding(positions)
        if self.config.prefix_projection:
            table = self.trans(table)
        return table

    def forward(
        self, batch_size: int, dtype: torch.dtype | None = None
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per-layer ``(key, value)`` pairs, each ``(batch, num_kv_heads, pre_seq_len, head_dim)``.

        Dropout acts after the batch expansion so each example gets its own mask, as in ChatGLM.
        """
        shape = self.kv_shape
        table = self.table()
        prefix = table.unsqueeze(0).expand(batch_size, -1, -1)
        prefix = prefix.view(
            batch_size, self.config.pre_seq_len, 2 * shape.num_layers, shape.num_kv_heads, shape.head_dim
        )
        prefix = self.dropout(prefix)
        if dtype is not None:
            prefix = prefix.to(dtype)
        # (B, P, 2L, H, D) -> (2L, B, H, P, D): slot 2i is layer i's key, slot 2i+1 its value.
        slots = prefix.permute(2, 0, 3, 1, 4)
        return [(slots[2 * i], slots[2 * i + 1]) for i in range(shape.num_layers)]
