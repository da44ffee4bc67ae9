"""What every tuning method gives the rest of the package: a config dataclass and a handle on the model.

A method attaches to a transformers model and leaves one attribute, ``model.tuning``: a :class:`TuningMethod`. The
trainer, the loaders, evaluation and the chat front ends talk only to it:

- ``trainable_parameters()``: what the optimizer updates (and the health checks watch);
- ``state_dict()`` / ``load_state_dict()``: what a checkpoint holds, by the names the method chose;
- ``save(directory)``: the checkpoint (``tuning_config.json`` with a ``"method"`` field, plus the tensors);
- ``bare()``: a context in which the model runs as the backbone alone (before/after comparisons);
- ``kv_table()``: for methods whose effect at inference is a key/value prefix, the per-layer table the serving
  engine batches across checkpoints (None for the others); ``checkpoint_table(backbone, record)`` computes the same
  from a checkpoint without attaching anything;
- ``from_checkpoint(model, record)``: attach the method a checkpoint record holds, with its tensors.

What a method is and allows (kind, default learning rate, quantizations, ...) is its entry in ``catalog.py``.

The model object stays what it was (a ``GlmForCausalLM``, ...), so ``forward``, ``generate``, the Trainer and
DeepSpeed see an ordinary transformers model.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import fields
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from ..checkpoint import (
    HEAD_KEY,
    TUNING_CONFIG,
    TUNING_WEIGHTS,
    CheckpointFormat,
    CheckpointRecord,
    read_tuning_checkpoint,
    register_format,
    write_tuning_checkpoint,
)
from .catalog import CATALOG

# Task heads of the NLU classes (``...ForSequenceClassification``/``...ForTokenClassification``): randomly
# initialised, so they train, and are saved, with the method.
HEAD_NAMES = ("score", "classifier")


def config_from_settings(config_class: type, settings: dict[str, Any]) -> Any:
    """A method's config dataclass from a mapping of every method's settings (the training flags).

    Field names double as ``ptuning_v2.train`` flags, so they are unique across methods unless they mean the same
    thing (``pre_seq_len``: the number of virtual tokens). Settings of other methods are ignored."""
    return config_class(**{f.name: settings[f.name] for f in fields(config_class) if f.name in settings})


def trainable_head(model: nn.Module) -> dict[str, nn.Module]:
    """The NLU task head (``score``/``classifier``) of a classification model, if any."""
    return {
        name: getattr(model, name) for name in HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)
    }


def head_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        f"{HEAD_KEY}{name}.{key}": value.detach().cpu().contiguous()
        for name, head in trainable_head(model).items()
        for key, value in head.state_dict().items()
    }


def load_head_state(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Copy ``head.<name>.*`` tensors into the model's task head; every mismatch names ``where``."""
    heads = trainable_head(model)
    for key, value in state.items():
        if not key.startswith(HEAD_KEY):
            continue
        name, param = key[len(HEAD_KEY) :].split(".", 1)
        if name not in heads:
            raise ValueError(f"checkpoint {where} holds a task head '{name}' this model lacks")
        target = heads[name].get_parameter(param)
        if target.shape != value.shape:
            raise ValueError(
                f"checkpoint {where}: {key} has shape {tuple(value.shape)}, model expects "
                f"{tuple(target.shape)} (a different number of labels?)"
            )
        with torch.no_grad():
            target.copy_(value)


def base_model_info(model: nn.Module) -> dict[str, Any]:
    return {
        "model_type": getattr(model.config, "model_type", None),
        "name_or_path": getattr(model.config, "_name_or_path", None),
        "architecture": type(model).__name__,
    }


class TuningMethod:
    """The handle a method leaves on the model as ``model.tuning``; subclasses implement one method each."""

    name: ClassVar[str]
    config_class: ClassVar[type]

    def __init__(self, model: nn.Module, config: Any) -> None:
        self.model = model
        self.config = config
        self.enabled = True

    # -- what subclasses provide

    @classmethod
    def attach(cls, model: nn.Module, config: Any, tokenizer: Any = None) -> TuningMethod:
        """Freeze what the method does not train, add what it trains, set ``model.tuning``; return the handle.

        ``tokenizer``: the model's, for a method that needs it to start (Prompt Tuning from a text)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint of this method holds (CPU tensors)."""
        raise NotImplementedError

    def load_state_dict(self, state: dict[str, torch.Tensor], where: str) -> None:
        """Load tensors written by ``state_dict``; a missing, extra or misshapen tensor names ``where``."""
        raise NotImplementedError

    def kv_table(self) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per layer ``(keys, values)``, each ``(num_kv_heads, P, head_dim)``, when the method is a prefix at
        inference; None otherwise."""
        return None

    @classmethod
    def checkpoint_table(
        cls, backbone: nn.Module, record: CheckpointRecord
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """``kv_table()`` of a checkpoint on ``backbone``, without attaching it (methods that share a backbone)."""
        raise NotImplementedError(f"{cls.name} checkpoints change the backbone's weights; they have no table")

    # -- shared

    @classmethod
    def config_of(cls, record: CheckpointRecord) -> Any:
        """The method's config as a checkpoint records it; a bad field names the config file."""
        if isinstance(record.config, cls.config_class):
            return record.config
        try:
            return config_from_settings(cls.config_class, record.meta)
        except (TypeError, ValueError) as err:
            raise ValueError(f"{record.path / TUNING_CONFIG}: {err}") from err

    @classmethod
    def from_checkpoint(cls, model: nn.Module, record: CheckpointRecord) -> TuningMethod:
        """Attach the method with the checkpoint's config and load its tensors (a mismatch names the file)."""
        handle = cls.attach(model, cls.config_of(record))
        handle.load_state_dict(record.state_dict, str(record.path))
        return handle

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    @property
    def saves_backbone(self) -> bool:
        """Whether its checkpoint is the whole model (see the catalog)."""
        return CATALOG[self.name].saves_backbone

    def config_json(self) -> dict[str, Any]:
        return {
            "method": self.name,
            **self.config.to_dict(),
            "base_model": base_model_info(self.model),
        }

    def save(self, directory: str | Path) -> Path:
        """``tuning_model.safetensors`` + ``tuning_config.json``, written atomically (the config last)."""
        return write_tuning_checkpoint(directory, self.config_json(), self.state_dict())

    @contextmanager
    def bare(self) -> Iterator[nn.Module]:
        """Run the backbone without the method (without detaching it)."""
        self.enabled = False
        try:
            yield self.model
        finally:
            self.enabled = True

    def describe(self) -> str:
        settings = ", ".join(f"{k}={v}" for k, v in self.config.to_dict().items())
        return f"{self.name} ({settings})"


def set_handle(model: nn.Module, handle: TuningMethod) -> None:
    if getattr(model, "tuning", None) is not None:
        raise ValueError(f"this model already has a tuning method attached ({model.tuning.name})")
    # A plain attribute (the handle is not an nn.Module), so nn.Module does not register it as a submodule.
    model.tuning = handle


def tuning_of(model: nn.Module) -> TuningMethod:
    """The handle of the method attached to ``model`` (looking through DDP/DeepSpeed wrappers)."""
    while getattr(model, "tuning", None) is None and hasattr(model, "module"):
        model = model.module
    handle = getattr(model, "tuning", None)
    if handle is None:
        raise ValueError("this model has no tuning method attached (see ptuning_v2.methods.attach_method)")
    return handle


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; bitsandbytes 4-bit weights count as their logical size."""
    trainable = total = 0
    for param in model.parameters():
        n = param.numel()
        if param.__class__.__name__ == "Params4bit":
            n *= 2  # two 4-bit values per stored byte
        total += n
        if param.requires_grad:
            trainable += n
    return trainable, total


def _holds_weights(method: str) -> bool:
    spec = CATALOG.get(method)
    return spec is None or not spec.saves_backbone  # an unknown method is named later, with the choices


register_format(
    CheckpointFormat(
        "ptuning_v2.tuning",
        0,
        lambda d: (d / TUNING_CONFIG).is_file(),
        lambda d: read_tuning_checkpoint(d, _holds_weights),
        f"{TUNING_CONFIG} (ours, any method)",
        (TUNING_CONFIG, TUNING_WEIGHTS),
    )
)
