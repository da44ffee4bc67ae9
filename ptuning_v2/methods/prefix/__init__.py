"""P-Tuning v2 and Prefix-Tuning, the prefix methods, in one home.

config.py   PrefixConfig (its settings) and KVShape, the geometry a model's cache needs
encoder.py  PrefixEncoder: the table, and its layout (layer i's key and value) defined once
hook.py     the forward pre-hook that carries the prefix into a frozen model through its cache
formats.py  its checkpoints: ours, THUDM's official ptuning and PEFT prefix-tuning adapters
method.py   PrefixMethod, the handle (``model.tuning``), and attach / load / bake / export
"""

from .config import KVShape, PrefixConfig, kv_shape_from_config
from .encoder import PrefixEncoder
from .formats import PrefixCheckpoint, load_prefix_checkpoint, write_prefix_checkpoint
from .method import (
    PrefixMethod,
    attach_prefix,
    bake_prefix,
    export_peft_adapter,
    load_prefix,
    load_prefix_into_encoder,
    load_prefix_weights,
)

__all__ = [
    "KVShape",
    "PrefixCheckpoint",
    "PrefixConfig",
    "PrefixEncoder",
    "PrefixMethod",
    "attach_prefix",
    "bake_prefix",
    "export_peft_adapter",
    "kv_shape_from_config",
    "load_prefix",
    "load_prefix_checkpoint",
    "load_prefix_into_encoder",
    "load_prefix_weights",
    "write_prefix_checkpoint",
]
