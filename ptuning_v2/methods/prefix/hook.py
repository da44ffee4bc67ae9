"""The hook that carries a prefix into a frozen transformers model (the prefix methods' engine room).

The model object stays what it was (a ``GlmForCausalLM``, ``Qwen2ForCausalLM``, ``...ForSequenceClassification``)
so ``forward``, ``generate``, the Trainer and DeepSpeed all see an ordinary transformers model. A forward pre-hook
rewrites each call:

- the cache (``cache`` from transformers 5.24, ``past_key_values`` before; see ``compat``): the prefix as a
  transformers ``Cache`` (tuples are refused by transformers 5), in the model's compute dtype while the encoder
  stays fp32;
- ``attention_mask``: ``pre_seq_len`` ones prepended (without them the logits change silently);
- ``position_ids``: real tokens count from 0, left padding skipped (ChatGLM), or from ``pre_seq_len`` (PEFT).

``generate`` never sees the prefix: it builds positions and masks for the real tokens only, and the hook fills the
prefix into generate's empty cache on the first step, so the encoder runs once per batch, not once per token.
"""

from __future__ import annotations

import inspect
from typing import get_args

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer, get_layer_types_and_kwargs
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

from ...compat import cache_argument, forward_kwargs, pop_cache
from ...kv_cache import grow_in_place
from .config import PrefixConfig

# Set on a Cache once it holds the prefix; its value is the prefix length.
_PREFIX_MARK = "_ptuning_v2_prefix_len"


class ReadOnlyPrefixLayer(DynamicLayer):
    """One layer's prefix that ``update`` reads but never grows.

    Training forwards use it: a gradient-checkpointed layer replays its forward in the backward pass, and a cache
    that appended on every call would then hold the new keys twice.
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.keys, self.values = keys, values
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys = torch.cat([self.keys.to(key_states.device), key_states], dim=-2)
        values = torch.cat([self.values.to(value_states.device), value_states], dim=-2)
        return keys, values


def compute_dtype(model: nn.Module) -> torch.dtype:
    """The dtype activations flow in; embeddings are never quantised, so theirs is reliable."""
    return model.get_input_embeddings().weight.dtype


def _prefix_pairs(model: nn.Module, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return model.tuning.encoder(batch_size, dtype=compute_dtype(model))


def _read_only_cache(model: nn.Module, batch_size: int) -> Cache:
    cache = Cache(layers=[ReadOnlyPrefixLayer(k, v) for k, v in _prefix_pairs(model, batch_size)])
    setattr(cache, _PREFIX_MARK, model.tuning.config.pre_seq_len)
    return cache


def _fill_cache(model: nn.Module, cache: Cache, batch_size: int) -> Cache:
    # Decoding behind a prefix would re-copy it at every token in a DynamicLayer (kv_cache).
    grow_in_place(cache)
    for layer_idx, (key, value) in enumerate(_prefix_pairs(model, batch_size)):
        cache.update(key, value, layer_idx)
    setattr(cache, _PREFIX_MARK, model.tuning.config.pre_seq_len)
    return cache


# Families whose decoder loop hands every layer `None` for the cache when training under gradient
# checkpointing (GPT-2's `cache if not (self.gradient_checkpointing and self.training) else None`): the prefix
# would never reach a layer, and the extended mask would not match the keys.
CACHE_DROPPED_UNDER_CHECKPOINTING = frozenset({"gpt2", "gpt-sw3", "decision_transformer"})


def _check_checkpointing(model: nn.Module) -> None:
    layer = next(iter(model.tuning.checkpoint_layers), None)
    if layer is None or not layer.gradient_checkpointing:
        return
    model_type = getattr(model.config, "model_type", None)
    if model_type in CACHE_DROPPED_UNDER_CHECKPOINTING:
        raise ValueError(
            f"{type(model).__name__} ({model_type!r}) drops its cache when training under gradient "
            "checkpointing, so the prefix would not reach its layers; train it without gradient checkpointing"
        )
    func = getattr(layer, "_gradient_checkpointing_func", None)
    if getattr(func, "keywords", {}).get("use_reentrant", False):
        raise ValueError(
            "gradient checkpointing with use_reentrant=True cannot carry gradients to the prefix (it reaches the "
            "layers inside the cache, not as a tensor argument); enable it with "
            "activation_checkpointing_kwargs={'use_reentrant': False}"
        )


def _real_positions(
    real_mask: torch.Tensor | None, past_real: int, batch: int, q_len: int, device
) -> torch.Tensor:
    """Positions of the current tokens counted over real tokens only: left padding does not shift them."""
    if real_mask is None:
        return torch.arange(past_real, past_real + q_len, device=device).unsqueeze(0).expand(batch, -1)
    positions = real_mask.long().cumsum(-1) - 1
    return positions.masked_fill(real_mask == 0, 0)[:, -q_len:]


def _inject_prefix(model: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
    if not model.tuning.enabled:
        return None
    kwargs = forward_kwargs(model, args, kwargs)
    config: PrefixConfig = model.tuning.config
    pre_seq_len = config.pre_seq_len
    inputs = kwargs.get("input_ids")
    if inputs is None:
        inputs = kwargs.get("inputs_embeds")
    if inputs is None:
        raise ValueError("the prefix needs input_ids or inputs_embeds to size its batch")
    batch, q_len = inputs.shape[0], inputs.shape[1]
    if model.training:
        _check_checkpointing(model)

    cache = pop_cache(kwargs)
    past_real = 0
    if cache is None:
        if kwargs.get("use_cache") and not model.training:
            cache = _fill_cache(model, DynamicCache(config=model.config), batch)
        else:
            cache = _read_only_cache(model, batch)
    elif not isinstance(cache, Cache):
        raise TypeError(f"the cache must be a transformers Cache, got {type(cache).__name__}")
    elif getattr(cache, _PREFIX_MARK, None) == pre_seq_len:
        past_real = cache.get_seq_length() - pre_seq_len
    elif cache.get_seq_length() == 0:
        cache = _fill_cache(model, cache, batch)  # generate's fresh cache: first step
    else:
        raise ValueError(
            "the cache holds states that were not computed with this prefix; pass None (or a cache returned "
            "by this model) so the prefix can be placed first"
        )
    kwargs[model.tuning.cache_argument] = cache

    mask = kwargs.get("attention_mask")
    real_mask = None
    if mask is not None:
        if mask.dim() != 2:
            raise ValueError(
                f"attention_mask must be 2-D (batch, seq) with a prefix attached, got {tuple(mask.shape)}"
            )
        real_len = past_real + q_len
        if mask.shape[1] == real_len:
            real_mask = mask
            prefix_ones = torch.ones(batch, pre_seq_len, dtype=mask.dtype, device=mask.device)
            kwargs["attention_mask"] = torch.cat([prefix_ones, mask], dim=1)
        elif mask.shape[1] == pre_seq_len + real_len:
            real_mask = mask[:, pre_seq_len:]  # already extended by the caller, as PEFT users do
        else:
            raise ValueError(
                f"attention_mask has length {mask.shape[1]}; expected {real_len} (past + new tokens) or "
                f"{pre_seq_len + real_len} (with the {pre_seq_len} prefix positions)"
            )

    if kwargs.get("position_ids") is None:
        kwargs["position_ids"] = _real_positions(real_mask, past_real, batch, q_len, inputs.device)
    if config.position_convention == "peft":
        kwargs["position_ids"] = kwargs["position_ids"] + pre_seq_len
    return (), kwargs


# Cache layer types (transformers' `layer_types`) that hold each past token's keys and values: the only kind a
# prefix can be written into.
KEY_VALUE_LAYER_TYPES = frozenset({"full_attention", "sliding_attention", "chunked_attention"})
# What the other kinds hold instead, for the refusal message.
_OTHER_LAYER_TYPES = {
    "linear_attention": "a recurrent state (state-space or linear attention)",
    "conv": "a convolution state",
    "hybrid": "a recurrent state beside their keys",
    "hybrid_sliding": "a recurrent state beside their keys",
    "dummy": "nothing of their own: they read another layer's cache",
    "indexed_attention": "indexed, compressed keys",
}
# Families whose forward takes no position_ids but whose ALiBi counts positions over the attention mask.
# Checked: the prefix then acts as PEFT's, and a left-padded batch generates what each prompt generates alone.
POSITIONS_FROM_MASK = frozenset({"bloom"})


def _why_no_prefix(model: nn.Module, cache_name: str | None, config: PrefixConfig) -> str | None:
    """Why ``model`` cannot carry a prefix, or None. Its geometry is checked by ``kv_shape_from_config``."""
    if cache_name is None:  # RWKV, XLNet, Reformer, OpenAI GPT; Mamba before transformers 5.24
        return "its forward takes no key/value cache (neither `cache` nor `past_key_values`)"
    model_config = model.config
    if hasattr(model_config, "get_text_config"):
        model_config = model_config.get_text_config(decoder=True)
    model_type = getattr(model_config, "model_type", None)
    if model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        # BERT, RoBERTa, XLM, BART, ...: an encoder (or encoder-decoder) run left to right. It attends both
        # ways unless is_decoder=True; RoBERTa-style ones number positions from padding_idx + 1; some keep an
        # EncoderDecoderCache. The prefix's mask, positions and cache are those of a decoder-only LM.
        return (
            f"{model_type!r} is an encoder family (transformers also has a masked-LM head for it), "
            "not a decoder-only LM"
        )
    annotation = inspect.signature(model.forward).parameters[cache_name].annotation
    for cache_class in get_args(annotation) or (annotation,):
        if isinstance(cache_class, type) and cache_class.__name__.endswith("Cache"):
            if not issubclass(cache_class, Cache):  # xLSTM's xLSTMCache
                return f"its cache is a {cache_class.__name__}, not a transformers per-layer key/value Cache"
    try:
        layer_types, _ = get_layer_types_and_kwargs(model_config)
    except (AttributeError, TypeError, ValueError):  # no layer structure (ChatGLM's remote code): attention
        layer_types = []
    other = sorted({kind for kind in layer_types if kind not in KEY_VALUE_LAYER_TYPES})
    if other:
        held = "; ".join(
            f"{kind!r} layers hold {_OTHER_LAYER_TYPES.get(kind, 'compressed keys')}" for kind in other
        )
        return f"{held}, not each token's keys and values; a prefix needs key/value attention in every layer"
    if (getattr(model_config, "n_recurrent_loops", None) or 1) > 1:
        # Dory: the recurrent block runs n_recurrent_loops times, each loop on its own copies of its layers'
        # caches.
        return (
            f"its recurrent block runs {model_config.n_recurrent_loops} times over copies of its cache "
            "layers, so the cache does not have one key/value layer per decoder layer"
        )
    takes_positions = "position_ids" in inspect.signature(model.forward).parameters
    if not takes_positions and model_type not in POSITIONS_FROM_MASK:
        # The model numbers positions itself by cache slot (MPT's ALiBi; the position embeddings of TrOCR,
        # Whisper, Pegasus, ... decoders), left padding included, and the hook's position_ids go nowhere.
        return (
            "its forward takes no position_ids and it numbers positions by cache slot, so left padding would "
            "sit between the prefix and the tokens and shift them"
        )
    if (
        not takes_positions or getattr(model_config, "alibi", False)
    ) and config.position_convention != "peft":
        # Bloom, and Falcon with alibi=True: ALiBi counts the attention mask and ignores position_ids, so real
        # tokens follow the prefix as in PEFT however a row is padded; they cannot start at 0.
        return (
            "its ALiBi positions come from the attention mask, not position_ids: real tokens always follow "
            "the prefix as in PEFT; use PrefixConfig(position_convention='peft')"
        )
    return None


def check_prefix_fits_model(model: nn.Module, config: PrefixConfig) -> str:
    """The name of ``model``'s cache argument; TypeError naming why a prefix cannot be carried."""
    cache_name = cache_argument(model)
    refusal = _why_no_prefix(model, cache_name, config)
    if refusal is not None:
        raise TypeError(f"{type(model).__name__} cannot carry a prefix: {refusal}")
    return cache_name


def install_prefix_hook(model: nn.Module) -> None:
    """Route every forward of ``model`` through ``_inject_prefix``; ``model.tuning`` holds the prefix."""
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    for layer in layers:
        # Safe because training forwards get a read-only prefix cache (see ReadOnlyPrefixLayer).
        layer._can_checkpoint_with_cache = True
    model.tuning.checkpoint_layers = tuple(layers[:1])
    model.register_forward_pre_hook(_inject_prefix, with_kwargs=True)
