"""Full fine-tuning, the baseline every parameter-efficient method is measured against: everything trains.

A checkpoint is a whole transformers model directory (``save_pretrained``) beside ``tuning_config.json``, so it
loads as a backbone of its own. A 4/8-bit backbone cannot be fine-tuned this way (bitsandbytes weights take no
optimizer step) and is refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..checkpoint import write_tuning_checkpoint
from ..files import atomic_directory
from .base import TuningMethod, set_handle


@dataclass
class FullConfig:
    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class FullFineTuning(TuningMethod):
    name = "full"
    config_class = FullConfig

    @classmethod
    def attach(cls, model: nn.Module, config: FullConfig, tokenizer: Any = None) -> FullFineTuning:
        if getattr(model, "is_quantized", False):
            raise ValueError(
                "full fine-tuning cannot train a 4/8-bit backbone (bitsandbytes weights take no optimizer "
                "step); load it unquantized (QUANTIZATION_BIT=none) or choose a parameter-efficient method"
            )
        model.requires_grad_(True)
        handle = cls(model, config)
        set_handle(model, handle)
        return handle

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state: dict[str, torch.Tensor], where: str) -> None:
        result = self.model.load_state_dict(state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"full checkpoint {where}: missing {result.missing_keys[:4]}, unexpected {result.unexpected_keys[:4]}"
            )

    def save(self, directory: str | Path) -> Path:
        with atomic_directory(Path(directory), replace=False) as tmp:
            self.model.save_pretrained(str(tmp))
        return self.write_config(directory)

    def write_config(self, directory: str | Path) -> Path:
        """``tuning_config.json`` beside a model directory written by ``save_pretrained`` (or the Trainer)."""
        return write_tuning_checkpoint(directory, self.config_json(), None)

    @contextmanager
    def bare(self) -> Iterator[nn.Module]:
        raise ValueError(
            "full fine-tuning changed the backbone itself, so there is no bare backbone to run beside it; "
            "evaluate the base model separately"
        )
        yield self.model  # pragma: no cover
