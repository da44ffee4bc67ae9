"""The tuning methods, one module each, behind one switch (``--method`` / ``METHOD=``).

    ptuning_v2     deep prompts: a key/value table per layer                     (prefix.py)
    prefix_tuning  deep prompts through a 2-layer MLP                            (prefix.py)
    ptuning_v1     virtual tokens at the input from an LSTM/MLP prompt encoder   (ptuning_v1.py)
    prompt_tuning  virtual tokens at the input, a plain table                   (prompt_tuning.py)
    lora           low-rank updates of the linear layers, through PEFT           (lora.py)
    full           every parameter trains                                        (full.py)

Adding a method: a module with a config dataclass (fields = its training flags) and a ``TuningMethod`` subclass
(``attach``, ``state_dict``, ``load_state_dict``; ``bare``/``kv_table``/``save`` where the defaults don't fit),
and one line in ``METHODS`` below.
"""

from __future__ import annotations

from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any, get_type_hints

from torch import nn

from ..checkpoint import PREFIX_METHODS, checkpoint_method, read_tuning_checkpoint
from .base import TuningMethod, config_from_settings, count_parameters, trainable_head, tuning_of
from .full import FullFineTuning
from .lora import Lora
from .prefix import PrefixMethod, attach_prefix, bake_prefix, export_peft_adapter, load_prefix
from .prompt_tuning import PromptTuning
from .ptuning_v1 import PTuningV1

METHODS: dict[str, type[TuningMethod]] = {
    "ptuning_v2": PrefixMethod,
    "prefix_tuning": PrefixMethod,
    "ptuning_v1": PTuningV1,
    "prompt_tuning": PromptTuning,
    "lora": Lora,
    "full": FullFineTuning,
}

__all__ = [
    "METHODS",
    "TuningMethod",
    "attach_method",
    "attach_prefix",
    "bake_prefix",
    "checkpoint_method",
    "count_parameters",
    "export_peft_adapter",
    "load_method",
    "method_class",
    "method_config",
    "method_settings",
    "trainable_head",
    "tuning_of",
]


def method_class(name: str) -> type[TuningMethod]:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name]


def method_config(name: str, settings: dict[str, Any]) -> Any:
    """The config of method ``name`` from the training settings (a mapping holding at least its fields)."""
    cls = method_class(name)
    if cls is PrefixMethod:
        return PrefixMethod.settings_config(name, settings)
    return config_from_settings(cls.config_class, settings)


def method_settings() -> dict[str, Any]:
    """Every method's config fields with their defaults: the method flags of ``ptuning_v2.train``."""
    settings: dict[str, Any] = {}
    for cls in METHODS.values():
        hints = get_type_hints(cls.config_class)  # resolved: the parser needs real types, not strings
        for f in fields(cls.config_class):
            default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
            if f.name in settings and settings[f.name][1] != default:
                raise TypeError(
                    f"method setting {f.name!r} has two defaults ({settings[f.name][1]!r}, {default!r})"
                )
            settings[f.name] = (hints[f.name], default)
    return settings


def attach_method(model: nn.Module, name: str, config: Any = None) -> TuningMethod:
    """Attach method ``name`` (with ``config``, or its defaults) to ``model``; returns ``model.tuning``."""
    cls = method_class(name)
    if config is None:
        config = method_config(name, {})
    return cls.attach(model, config)


def load_method(model: nn.Module, path: str | Path) -> TuningMethod:
    """Attach the method a checkpoint records and load its tensors; a checkpoint that does not fit is named.

    Full fine-tuning checkpoints are whole models: load them as the backbone (``load_model`` does).
    """
    method = checkpoint_method(path)
    if method in PREFIX_METHODS:
        load_prefix(model, path)
        return model.tuning
    cls = method_class(method)
    if cls.saves_backbone:
        raise ValueError(f"{path} is a {method} checkpoint, a whole model: load it as the model itself")
    directory = Path(path)
    if method == "lora" and not (directory / "tuning_config.json").is_file():
        from .lora import read_peft_lora  # an adapter saved by PEFT itself

        peft_config, state = read_peft_lora(directory)
        handle = Lora.attach(model, method_config("lora", {}), peft_config=peft_config)
        handle.load_state_dict(state, str(directory))
        return handle
    checkpoint = read_tuning_checkpoint(directory)
    try:
        config = method_config(method, checkpoint.meta)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{directory / 'tuning_config.json'}: {err}") from err
    handle = cls.attach(model, config)
    handle.load_state_dict(checkpoint.state_dict, str(directory))
    return handle
