"""The tuning methods, one module each, behind one switch (``--method`` / ``METHOD=``); ``catalog.py`` lists them.

What each method is and allows is its entry in ``catalog.py`` (torch-free). This module turns a name into the
method: its handle class and config, attached to a model or loaded from a checkpoint. It imports a method's
module only when that method is used, so ``ptuning_v2.methods`` and its catalog load without torch.

Adding a method: a module with a config dataclass (fields = its training flags) and a ``TuningMethod`` subclass
(``attach``, ``state_dict``, ``load_state_dict``; ``bare``/``kv_table``/``save``/``from_checkpoint`` where the
defaults don't fit), and one entry in ``catalog.py``.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any, get_type_hints

from .catalog import CATALOG, MethodSpec, method_spec

if TYPE_CHECKING:
    from torch import nn

    from ..checkpoint import CheckpointRecord
    from .base import TuningMethod

METHODS: dict[str, MethodSpec] = CATALOG  # name -> its catalog entry

__all__ = [
    "METHODS",
    "MethodSpec",
    "attach_method",
    "attach_prefix",
    "bake_prefix",
    "checkpoint_method",
    "count_parameters",
    "export_peft_adapter",
    "load_method",
    "load_prefix",
    "method_class",
    "method_config",
    "method_settings",
    "method_spec",
    "read_checkpoint",
    "trainable_head",
    "tuning_of",
]

# Names that live in a method's own module or in base.py, loaded on first use.
_EXPORTS = {
    "TuningMethod": "base",
    "count_parameters": "base",
    "trainable_head": "base",
    "tuning_of": "base",
    "attach_prefix": "prefix",
    "bake_prefix": "prefix",
    "export_peft_adapter": "prefix",
    "load_prefix": "prefix",
}


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)


def method_class(name: str) -> type[TuningMethod]:
    spec = method_spec(name)
    return getattr(import_module(f".{spec.module}", __name__), spec.handle)


def method_config(name: str, settings: dict[str, Any]) -> Any:
    """The config of method ``name`` from the training settings (a mapping holding at least its fields)."""
    config_class = method_class(name).config_class
    known = {f.name for f in fields(config_class)}
    given = {k: v for k, v in {**settings, **method_spec(name).implies}.items() if k in known}
    return config_class(**given)


def method_settings() -> dict[str, Any]:
    """Every method's config fields with their defaults: the method flags of ``ptuning_v2.train``."""
    settings: dict[str, Any] = {}
    for name in CATALOG:
        config_class = method_class(name).config_class
        hints = get_type_hints(config_class)  # resolved: the parser needs real types, not strings
        for f in fields(config_class):
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            if f.name in settings and settings[f.name][1] != default:
                raise TypeError(
                    f"method setting {f.name!r} has two defaults ({settings[f.name][1]!r}, {default!r})"
                )
            settings[f.name] = (hints[f.name], default)
    return settings


def attach_method(model: nn.Module, name: str, config: Any = None, tokenizer: Any = None) -> TuningMethod:
    """Attach method ``name`` (with ``config``, or its defaults) to ``model``; returns ``model.tuning``.

    ``tokenizer``: the model's, for methods that start from the embeddings of a text (``prompt_init text``)."""
    cls = method_class(name)
    if config is None:
        config = method_config(name, {})
    return cls.attach(model, config, tokenizer=tokenizer)


def read_checkpoint(path: str | Path) -> CheckpointRecord:
    """The checkpoint at ``path`` (any method, any format it comes in), read once: method, config, tensors.

    Every method's module is loaded first, since each registers the formats it reads."""
    from ..checkpoint import read_registered  # here: torch loads only once a checkpoint is read

    for spec in CATALOG.values():
        import_module(f".{spec.module}", __name__)
    record = read_registered(path)
    method_spec(record.method)  # an unknown method is named with the choices
    return record


def checkpoint_method(path: str | Path) -> str:
    """Which method wrote the checkpoint at ``path``."""
    return read_checkpoint(path).method


def load_method(model: nn.Module, checkpoint: CheckpointRecord | str | Path) -> TuningMethod:
    """Attach the method a checkpoint records and load its tensors; a checkpoint that does not fit is named.

    Full fine-tuning checkpoints are whole models: load them as the backbone (``load_model`` does).
    """
    record = checkpoint if not isinstance(checkpoint, (str, Path)) else read_checkpoint(checkpoint)
    if method_spec(record.method).saves_backbone:
        raise ValueError(
            f"{record.path} is a {record.method} checkpoint, a whole model: load it as the model itself"
        )
    return method_class(record.method).from_checkpoint(model, record)
