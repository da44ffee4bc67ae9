"""P-Tuning v2 and Prefix-Tuning for ChatGLM-style (MQA/GQA) decoders on transformers 5.

Names load lazily, so light entry points (``evaluate/rouge.py``) do not import torch and transformers.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "attach_prefix": "attach",
    "count_parameters": "attach",
    "prefix_disabled": "attach",
    "bake_prefix": "checkpoint",
    "export_peft_adapter": "checkpoint",
    "load_prefix": "checkpoint",
    "load_prefix_checkpoint": "checkpoint",
    "load_prefix_weights": "checkpoint",
    "save_prefix_checkpoint": "checkpoint",
    "write_prefix_checkpoint": "checkpoint",
    "load_model": "loading",
    "load_tokenizer": "loading",
    "KVShape": "prefix_encoder",
    "PrefixConfig": "prefix_encoder",
    "PrefixEncoder": "prefix_encoder",
    "kv_shape_from_config": "prefix_encoder",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'ptuning_v2' has no attribute {name!r}")
    value = getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
