"""The rows decoded together and the surgery on their shared cache.

- each row of the cache starts with its own prefix, right-aligned in a prefix block as wide as the longest prefix
  in the batch; the slots a shorter (or no) prefix leaves free are masked out, as is the left padding of the
  prompts;
- positions count a row's real tokens only, from 0 (ChatGLM's convention) or from its prefix length (PEFT's), as
  ``attach_prefix`` does, so a row computes what it computes alone;
- rows that finish leave (``select``), rows prefilled meanwhile join (``merge``);
- the cache's layers grow into spare room (``kv_cache``), so a decoding step copies its new token only.

The model itself is called through a ``Forward`` the engine passes in, so that the engine alone owns the model
call (and what it keeps of the logits).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import DynamicCache

from ..kv_cache import grow_in_place
from .requests import Request

# (input_ids, attention_mask, position_ids, cache) -> the last position's logits; grows the cache in place.
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, DynamicCache], torch.Tensor]


@dataclass
class Batch:
    """The rows being decoded together: their cache, attention mask, next positions and next tokens."""

    rows: list[Request]
    cache: DynamicCache
    mask: torch.Tensor  # (B, cache length): 0 for unused prefix slots and left padding
    positions: torch.Tensor  # (B, 1): the position of each row's next token
    next_tokens: list[int] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.rows)

    @classmethod
    def prefill(
        cls, requests: list[Request], forward: Forward, pad_id: int, device: torch.device, config: Any
    ) -> tuple[Batch, torch.Tensor]:
        """Run the prompts of newly arrived requests, each row behind its own prefix: the batch, and the logits
        its first tokens are chosen from."""
        width = max(len(r.ids) for r in requests)
        prefix_width = max((r.prefix.length for r in requests if r.prefix), default=0)
        ids = torch.full((len(requests), width), pad_id, dtype=torch.long)
        real = torch.zeros(len(requests), width, dtype=torch.long)
        prefix_mask = torch.zeros(len(requests), prefix_width, dtype=torch.long)
        offsets = torch.zeros(len(requests), 1, dtype=torch.long)  # where a row's positions start
        for row, request in enumerate(requests):
            ids[row, width - len(request.ids) :] = torch.tensor(request.ids)
            real[row, width - len(request.ids) :] = 1
            if request.prefix is not None:
                prefix_mask[row, prefix_width - request.prefix.length :] = 1
                if request.prefix.position_convention == "peft":
                    offsets[row] = request.prefix.length
        positions = (real.cumsum(-1) - 1).clamp(min=0) + offsets
        cache = _prefix_cache(requests, prefix_width, device, config)
        mask = torch.cat([prefix_mask, real], dim=1).to(device)
        logits = forward(ids.to(device), mask, positions.to(device), cache)
        return cls(list(requests), cache, mask, positions[:, -1:].to(device) + 1), logits

    def step(self, forward: Forward, device: torch.device) -> torch.Tensor:
        """Feed every row its next token; the logits the tokens after them are chosen from."""
        tokens = torch.tensor(self.next_tokens, device=device).unsqueeze(1)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        logits = forward(tokens, self.mask, self.positions, self.cache)
        self.positions = self.positions + 1
        return logits

    def select(self, keep: list[int]) -> None:
        """Keep only these rows, and drop cache columns that are now masked in every row."""
        index = torch.tensor(keep, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        self.mask = self.mask.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        self.next_tokens = [self.next_tokens[i] for i in keep]
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        layers = [
            (
                layer.keys.index_select(0, index)[:, :, start:],
                layer.values.index_select(0, index)[:, :, start:],
            )
            for layer in self.cache.layers
        ]
        self.mask = self.mask[:, start:]
        self.cache = grow_in_place(DynamicCache(ddp_cache_data=layers))

    @staticmethod
    def merge(old: Batch | None, new: Batch) -> Batch:
        """One batch of both: the shorter cache is padded on the left (masked), then rows are stacked."""
        if old is None:
            return new
        length = max(old.mask.shape[1], new.mask.shape[1])
        layers = [
            (
                torch.cat([_left_pad(a.keys, length), _left_pad(b.keys, length)]),
                torch.cat([_left_pad(a.values, length), _left_pad(b.values, length)]),
            )
            for a, b in zip(old.cache.layers, new.cache.layers)
        ]
        mask = torch.cat([_left_pad(old.mask, length), _left_pad(new.mask, length)])
        return Batch(
            old.rows + new.rows,
            grow_in_place(DynamicCache(ddp_cache_data=layers)),
            mask,
            torch.cat([old.positions, new.positions]),
            old.next_tokens + new.next_tokens,
        )


def _prefix_cache(
    requests: list[Request], prefix_width: int, device: torch.device, config: Any
) -> DynamicCache:
    if prefix_width == 0:
        return grow_in_place(DynamicCache(config=config))
    layers = []
    sample = next(r.prefix for r in requests if r.prefix)
    for layer in range(len(sample.keys)):
        heads, _, head_dim = sample.keys[layer].shape
        shape = (len(requests), heads, prefix_width, head_dim)
        keys = torch.zeros(shape, dtype=sample.keys[layer].dtype, device=device)
        values = torch.zeros_like(keys)
        for row, request in enumerate(requests):
            if request.prefix is not None:
                keys[row, :, prefix_width - request.prefix.length :] = request.prefix.keys[layer]
                values[row, :, prefix_width - request.prefix.length :] = request.prefix.values[layer]
        layers.append((keys, values))
    return grow_in_place(DynamicCache(ddp_cache_data=layers, config=config))


def _left_pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Pad the sequence dimension (last for masks, third for cache tensors) with zeros on the left."""
    dim = 1 if tensor.dim() == 2 else 2
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)
