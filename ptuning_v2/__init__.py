"""P-Tuning v2 and Prefix-Tuning for ChatGLM-style (MQA/GQA) decoders on transformers 5."""

from .attach import attach_prefix, count_parameters
from .checkpoint import (
    bake_prefix,
    export_peft_adapter,
    load_prefix,
    load_prefix_checkpoint,
    load_prefix_weights,
    save_prefix_checkpoint,
    write_prefix_checkpoint,
)
from .loading import load_model, load_tokenizer
from .prefix_encoder import KVShape, PrefixConfig, PrefixEncoder, kv_shape_from_config

__all__ = [
    "KVShape",
    "PrefixConfig",
    "PrefixEncoder",
    "attach_prefix",
    "bake_prefix",
    "count_parameters",
    "export_peft_adapter",
    "kv_shape_from_config",
    "load_model",
    "load_prefix",
    "load_prefix_checkpoint",
    "load_prefix_weights",
    "load_tokenizer",
    "save_prefix_checkpoint",
    "write_prefix_checkpoint",
]
