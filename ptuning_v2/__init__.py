"""P-Tuning v2, Prefix-Tuning and the prompt-tuning family for ChatGLM-style (MQA/GQA) decoders on transformers 5.

Names load lazily, so light entry points (``evaluate/rouge.py``) do not import torch and transformers.
"""

from importlib import import_module
from typing import Any

_EXPORTS = {
    "attach_method": "methods",
    "attach_prefix": "methods",
    "bake_prefix": "methods",
    "count_parameters": "methods",
    "export_peft_adapter": "methods",
    "load_method": "methods",
    "load_prefix": "methods",
    "tuning_of": "methods",
    "METHODS": "methods",
    "read_checkpoint": "methods",
    "checkpoint_method": "methods",
    "load_prefix_weights": "methods.prefix",
    "load_prefix_checkpoint": "methods.prefix",
    "write_prefix_checkpoint": "methods.prefix",
    "load_model": "loading",
    "load_tokenizer": "loading",
    "KVShape": "methods.prefix",
    "PrefixConfig": "methods.prefix",
    "PrefixEncoder": "methods.prefix",
    "kv_shape_from_config": "methods.prefix",
}
__all__ = sorted(_EXPORTS)
# Removed names kept for one release; they warn when called (see deprecated.py) and are left out of __all__.
_DEPRECATED = {"prefix_disabled": "deprecated", "save_prefix_checkpoint": "deprecated"}


def __getattr__(name: str) -> Any:
    home = _EXPORTS.get(name) or _DEPRECATED.get(name)
    if home is None:
        raise AttributeError(f"module 'ptuning_v2' has no attribute {name!r}")
    value = getattr(import_module(f".{home}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
