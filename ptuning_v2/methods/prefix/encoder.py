"""The prefix: a trainable key/value table per layer, laid out exactly as THUDM's ChatGLM2/3 code lays it out.

P-Tuning v2 (``prefix_projection=False``) learns the table directly: ``Embedding(pre_seq_len, kv_size)``.
Prefix-Tuning (``prefix_projection=True``) reparameterises it through a 2-layer MLP,
``Embedding(pre_seq_len, kv_size) -> Linear(kv_size, h) -> Tanh -> Linear(h, kv_size)``, which trains more stably.

``kv_size = num_layers * 2 * num_kv_heads * head_dim``. A row of the table, viewed as
``(2 * num_layers, num_kv_heads, head_dim)``, holds layer i's key in slot ``2i`` and its value in slot ``2i + 1``
(``table_slots`` and ``layer_pairs``, the layout's one definition).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import KVShape, PrefixConfig


def table_slots(table: torch.Tensor, shape: KVShape) -> torch.Tensor:
    """``(B, P, kv_size)`` -> ``(B, P, 2 * num_layers, num_kv_heads, head_dim)``."""
    return table.view(
        table.shape[0], table.shape[1], 2 * shape.num_layers, shape.num_kv_heads, shape.head_dim
    )


def layer_pairs(slots: torch.Tensor, shape: KVShape) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``table_slots``' output -> per layer ``(key, value)``, each ``(B, num_kv_heads, P, head_dim)``."""
    # (B, P, 2L, H, D) -> (2L, B, H, P, D): slot 2i is layer i's key, slot 2i+1 its value.
    slots = slots.permute(2, 0, 3, 1, 4)
    return [(slots[2 * i], slots[2 * i + 1]) for i in range(shape.num_layers)]


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
        prefix = table_slots(self.table().unsqueeze(0).expand(batch_size, -1, -1), self.kv_shape)
        prefix = self.dropout(prefix)
        if dtype is not None:
            prefix = prefix.to(dtype)
        return layer_pairs(prefix, self.kv_shape)

    @torch.no_grad()
    def kv_table(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(keys, values)``, each ``(num_kv_heads, P, head_dim)``, without dropout (inference)."""
        was_training = self.training
        try:
            pairs = self.eval()(1)
        finally:
            self.train(was_training)
        return [(key[0], value[0]) for key, value in pairs]
