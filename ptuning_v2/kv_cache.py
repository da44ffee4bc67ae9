"""A key/value cache layer that grows into spare room instead of re-concatenating its whole past at every step.

transformers' ``DynamicLayer.update`` runs ``torch.cat([past, new])``: each generated token copies every key and
value cached so far, a 128-token prefix included, in every layer. ``GrowingLayer`` keeps a buffer with room to
spare and writes the new tokens into it; its ``keys`` and ``values`` are views of the filled part, so everything
transformers does with a ``DynamicLayer`` (masks from ``get_seq_length``, ``crop``, batch selection) still works,
and a view replaced by another tensor (``batch_select_indices``) makes the next update start a new buffer.

Used where no gradient flows (generation, serving): an in-place write into a buffer that autograd has seen would
break a later backward.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

# Room added when a buffer is full: at least this many tokens, or half of what it holds.
MIN_GROWTH = 256


class GrowingLayer(DynamicLayer):
    """A ``DynamicLayer`` whose ``update`` copies only the new tokens (amortised), not the whole past."""

    _key_buffer: torch.Tensor | None = None
    _value_buffer: torch.Tensor | None = None

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.get_seq_length()
        needed = length + key_states.shape[-2]
        if not self._fits(key_states, length, needed):
            self._grow(key_states, value_states, length, needed)
        self._key_buffer[..., length:needed, :] = key_states
        self._value_buffer[..., length:needed, :] = value_states
        self.keys = self._key_buffer[..., :needed, :]
        self.values = self._value_buffer[..., :needed, :]
        return self.keys, self.values

    def _fits(self, key_states: torch.Tensor, length: int, needed: int) -> bool:
        buffer = self._key_buffer
        if buffer is None or buffer.shape[-2] < needed or buffer.shape[:2] != key_states.shape[:2]:
            return False
        # keys replaced by another tensor (batch selection, reset): the buffer no longer holds them
        return length == 0 or (
            self.keys.data_ptr() == buffer.data_ptr()
            and self.values.data_ptr() == self._value_buffer.data_ptr()
        )

    def _grow(self, key_states: torch.Tensor, value_states: torch.Tensor, length: int, needed: int) -> None:
        capacity = needed + max(MIN_GROWTH, needed // 2)
        keys = key_states.new_empty((*key_states.shape[:2], capacity, key_states.shape[-1]))
        values = value_states.new_empty((*value_states.shape[:2], capacity, value_states.shape[-1]))
        if length:
            keys[..., :length, :] = self.keys
            values[..., :length, :] = self.values
        self._key_buffer, self._value_buffer = keys, values

    @classmethod
    def holding(cls, keys: torch.Tensor, values: torch.Tensor) -> GrowingLayer:
        """A layer that starts with these keys and values (copied once into its buffer)."""
        layer = cls()
        layer.update(keys, values)
        return layer


def grow_in_place(cache: Cache) -> Cache:
    """Make the cache's plain ``DynamicLayer``s ``GrowingLayer``s, keeping what they hold; others (sliding-window,
    static) stay as they are. Returns the cache; a no-op where gradients are enabled."""
    if torch.is_grad_enabled():
        return cache
    for index, layer in enumerate(cache.layers):
        if type(layer) is DynamicLayer:
            if layer.is_initialized and layer.get_seq_length():
                cache.layers[index] = GrowingLayer.holding(layer.keys, layer.values)
            elif not layer.is_initialized:
                cache.layers[index] = GrowingLayer()
    return cache
