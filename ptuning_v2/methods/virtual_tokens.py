"""Virtual tokens at the input: what P-Tuning v1 and Prompt Tuning share.

Both put ``pre_seq_len`` trainable embeddings in front of every sequence, at the input layer only (shallow
prompts), and differ only in where the embeddings come from (a prompt encoder, or a plain table). A forward
pre-hook rewrites each call of the frozen model:

- ``input_ids`` become ``inputs_embeds`` with the virtual tokens first;
- ``attention_mask`` gets ``pre_seq_len`` ones in front, ``labels`` ``pre_seq_len`` ignored positions;
- positions: the virtual tokens take 0..P-1 and each row's real tokens count from P over its real tokens only, so
  left padding (between the virtual and the real tokens) shifts nothing.

In ``generate`` the virtual tokens enter on the first step only and then live in the cache, like a prefix. That
is also how the serving engine uses them: since attention is causal, the virtual tokens' keys and values never
depend on what follows, so ``kv_table`` computes them once and the engine serves them as a prefix whose real
tokens start at position P.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache

from ..compat import cache_argument, forward_kwargs, pop_cache
from .base import HEAD_KEY, TuningMethod, head_state_dict, load_head_state, set_handle, trainable_head

# Set on a cache once it holds the virtual tokens; its value is their number.
_PROMPT_MARK = "_ptuning_v2_virtual_tokens"


class VirtualTokenMethod(TuningMethod):
    """Base of the input-level methods; a subclass sets ``self.encoder`` (an nn.Module on the model)."""

    module_name = "prompt_encoder"

    def prompt_embeddings(self) -> torch.Tensor:
        """The ``(pre_seq_len, hidden_size)`` virtual-token embeddings, fp32, with gradients when training."""
        return self.encoder()

    @classmethod
    def build_encoder(cls, model: nn.Module, config: Any, tokenizer: Any = None) -> nn.Module:
        """The module whose forward gives the ``(pre_seq_len, hidden_size)`` virtual-token embeddings."""
        raise NotImplementedError

    @classmethod
    def attach(cls, model: nn.Module, config: Any, tokenizer: Any = None) -> VirtualTokenMethod:
        cache_name = cache_argument(model)
        if cache_name is None:
            raise TypeError(f"{type(model).__name__} cannot take virtual tokens: its forward takes no cache")
        model.requires_grad_(False)
        for head in trainable_head(model).values():
            head.requires_grad_(True)
        encoder = cls.build_encoder(model, config, tokenizer)
        device = model.get_input_embeddings().weight.device
        setattr(model, cls.module_name, encoder.to(device=device, dtype=torch.float32).train(model.training))
        handle = cls(model, config)
        handle.encoder = encoder
        handle.cache_argument = cache_name
        set_handle(model, handle)
        model.register_forward_pre_hook(_inject_virtual_tokens, with_kwargs=True)
        return handle

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = {k: v.detach().cpu().contiguous() for k, v in self.encoder.state_dict().items()}
        return {**state, **head_state_dict(self.model)}

    def load_state_dict(self, state: dict[str, torch.Tensor], where: str) -> None:
        own = {k: v for k, v in state.items() if not k.startswith(HEAD_KEY)}
        expected = self.encoder.state_dict()
        missing = sorted(set(expected) - set(own))
        unexpected = sorted(set(own) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"{self.name} checkpoint {where}: missing tensors {missing}, unexpected tensors {unexpected}"
            )
        for key, value in own.items():
            if tuple(value.shape) != tuple(expected[key].shape):
                raise ValueError(
                    f"{self.name} checkpoint {where}: {key} has shape {tuple(value.shape)}, this model and config "
                    f"expect {tuple(expected[key].shape)} (another backbone or pre_seq_len?)"
                )
        self.encoder.load_state_dict(own)
        load_head_state(self.model, state, where)

    def kv_table(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """What later tokens ever see of the virtual tokens (attention is causal): per layer their
        ``(kv_heads, P, head_dim)`` keys and values at positions 0..P-1."""
        was_training = self.encoder.training
        self.encoder.eval()
        try:
            with torch.no_grad(), self.bare():
                return virtual_token_kv(self.model, self.prompt_embeddings())
        finally:
            self.encoder.train(was_training)

    @classmethod
    def checkpoint_table(cls, backbone: nn.Module, record: Any) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A checkpoint's virtual tokens' keys and values on ``backbone``, without attaching anything to it."""
        config = cls.config_of(record)
        device = backbone.get_input_embeddings().weight.device
        # Initialised from random or sampled embeddings whatever the config says: the checkpoint's replace them.
        encoder = cls.build_encoder(backbone, config, tokenizer=None).float().eval().to(device)
        own = {k: v for k, v in record.state_dict.items() if not k.startswith(HEAD_KEY)}
        expected = encoder.state_dict()
        if set(own) != set(expected) or any(
            tuple(own[k].shape) != tuple(expected[k].shape) for k in expected
        ):
            raise ValueError(
                f"{record.method} checkpoint {record.path} does not fit this backbone: it holds "
                f"{ {k: tuple(v.shape) for k, v in own.items()} }, the backbone needs "
                f"{ {k: tuple(v.shape) for k, v in expected.items()} }"
            )
        encoder.load_state_dict(own)
        with torch.no_grad():
            embeddings = encoder()
        return virtual_token_kv(backbone, embeddings)


@torch.no_grad()
def virtual_token_kv(
    backbone: nn.Module, embeddings: torch.Tensor
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Run ``(P, hidden)`` virtual-token embeddings alone through a backbone (no hook of ours active); per layer
    their keys and values ``(kv_heads, P, head_dim)``."""
    was_training = backbone.training
    backbone.eval()
    try:
        embeds = embeddings.to(backbone.get_input_embeddings().weight)[None]
        positions = torch.arange(embeds.shape[1], device=embeds.device)[None]
        cache = DynamicCache(config=backbone.config)
        backbone(
            inputs_embeds=embeds, position_ids=positions, use_cache=True, **{cache_argument(backbone): cache}
        )
        return [(layer.keys[0], layer.values[0]) for layer in cache.layers]
    finally:
        backbone.train(was_training)


def _inject_virtual_tokens(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    handle: VirtualTokenMethod = model.tuning
    if not handle.enabled:
        return None
    kwargs = forward_kwargs(model, args, kwargs)
    cache = pop_cache(kwargs)
    n_virtual = handle.config.pre_seq_len
    if cache is not None and not isinstance(cache, Cache):
        raise TypeError(f"the cache must be a transformers Cache, got {type(cache).__name__}")
    if cache is not None and getattr(cache, _PROMPT_MARK, None) == n_virtual:
        return (), _continue(kwargs, cache, handle, n_virtual)
    if cache is not None and cache.get_seq_length() > 0:
        raise ValueError(
            "the cache holds states computed without the virtual tokens; pass None (or a cache returned by this "
            "model) so they can be placed first"
        )
    if cache is None and kwargs.get("use_cache") and not model.training:
        cache = DynamicCache(config=model.config)
    if cache is not None:
        setattr(cache, _PROMPT_MARK, n_virtual)
        kwargs[handle.cache_argument] = cache
    return (), _first_step(kwargs, model, handle, n_virtual)


def _first_step(kwargs: dict, model: nn.Module, handle: VirtualTokenMethod, n_virtual: int) -> dict:
    """Put the virtual tokens in front of the inputs, mask, labels and positions."""
    embeds = kwargs.pop("inputs_embeds", None)
    input_ids = kwargs.pop("input_ids", None)
    if embeds is None:
        if input_ids is None:
            raise ValueError("virtual tokens need input_ids or inputs_embeds")
        embeds = model.get_input_embeddings()(input_ids)
    batch, length = embeds.shape[:2]
    prompt = handle.prompt_embeddings().to(embeds.dtype)
    kwargs["inputs_embeds"] = torch.cat([prompt.unsqueeze(0).expand(batch, -1, -1), embeds], dim=1)
    mask = kwargs.get("attention_mask")
    if mask is not None and mask.dim() != 2:
        raise ValueError(
            f"attention_mask must be 2-D (batch, seq) with virtual tokens, got {tuple(mask.shape)}"
        )
    real = mask if mask is not None else torch.ones(batch, length, dtype=torch.long, device=embeds.device)
    ones = torch.ones(batch, n_virtual, dtype=real.dtype, device=real.device)
    if mask is not None:
        kwargs["attention_mask"] = torch.cat([ones, mask], dim=1)
    labels = kwargs.get("labels")
    if labels is not None:
        ignored = torch.full((batch, n_virtual), -100, dtype=labels.dtype, device=labels.device)
        kwargs["labels"] = torch.cat([ignored, labels], dim=1)
    given = kwargs.get("position_ids")
    real_positions = given if given is not None else (real.long().cumsum(-1) - 1).clamp(min=0)
    virtual = torch.arange(n_virtual, device=embeds.device).unsqueeze(0).expand(batch, -1)
    kwargs["position_ids"] = torch.cat([virtual, real_positions + n_virtual], dim=1)
    return kwargs


def _continue(kwargs: dict, cache: Cache, handle: VirtualTokenMethod, n_virtual: int) -> dict:
    """A later step: the virtual tokens are in the cache; extend the mask and shift the positions past them."""
    kwargs[handle.cache_argument] = cache
    inputs = kwargs.get("input_ids") if kwargs.get("input_ids") is not None else kwargs.get("inputs_embeds")
    batch, q_len = inputs.shape[0], inputs.shape[1]
    past_real = cache.get_seq_length() - n_virtual
    mask = kwargs.get("attention_mask")
    real = None
    if mask is not None:
        if mask.shape[1] == past_real + q_len:
            real = mask
            ones = torch.ones(batch, n_virtual, dtype=mask.dtype, device=mask.device)
            kwargs["attention_mask"] = torch.cat([ones, mask], dim=1)
        elif mask.shape[1] == n_virtual + past_real + q_len:
            real = mask[:, n_virtual:]
        else:
            raise ValueError(
                f"attention_mask has length {mask.shape[1]}; expected {past_real + q_len} (past + new tokens)"
            )
    if kwargs.get("position_ids") is None:
        if real is None:
            positions = torch.arange(past_real, past_real + q_len, device=inputs.device)[None].expand(
                batch, -1
            )
        else:
            positions = (real.long().cumsum(-1) - 1).clamp(min=0)[:, -q_len:]
        kwargs["position_ids"] = positions + n_virtual
    else:
        kwargs["position_ids"] = kwargs["position_ids"] + n_virtual
    return kwargs
