"""LoRA (through PEFT), the parameter-efficient baseline: low-rank updates beside the frozen linear layers.

PEFT's ``inject_adapter_in_model`` adds the adapters in place, so the model stays a transformers model as with
every other method here. A LoRA adapter saved by PEFT itself (``adapter_config.json`` of type LORA) loads too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model, set_peft_model_state_dict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..checkpoint import CheckpointRecord, read_peft_weights, register_peft_reader
from .base import HEAD_KEY, TuningMethod, head_state_dict, load_head_state, set_handle, trainable_head


@dataclass
class LoraMethodConfig:
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    # Comma-separated module names, or all-linear (every linear layer but the output head: PEFT's choice).
    lora_target_modules: str = "all-linear"

    def __post_init__(self) -> None:
        if self.lora_rank < 1:
            raise ValueError(f"lora_rank must be at least 1, got {self.lora_rank}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_target_modules.strip():
            raise ValueError("lora_target_modules is empty: name modules (q_proj,v_proj) or all-linear")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def peft_config(self) -> LoraConfig:
        targets = self.lora_target_modules.strip()
        modules: str | list[str] = (
            targets if targets == "all-linear" else [m.strip() for m in targets.split(",")]
        )
        return LoraConfig(
            r=self.lora_rank,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=modules,
        )


class Lora(TuningMethod):
    name = "lora"
    config_class = LoraMethodConfig

    @classmethod
    def attach(
        cls,
        model: nn.Module,
        config: LoraMethodConfig,
        tokenizer: Any = None,
        peft_config: LoraConfig | None = None,
    ) -> Lora:
        peft_config = peft_config or config.peft_config()
        if trainable_head(model) and peft_config.exclude_modules is None:
            # An NLU task head trains whole (below); all-linear would also put LoRA beside it, saving it twice.
            peft_config.exclude_modules = list(trainable_head(model))
        try:
            inject_adapter_in_model(peft_config, model)
        except ValueError as err:  # PEFT names target modules the model lacks
            raise ValueError(f"lora_target_modules {config.lora_target_modules!r}: {err}") from err
        for head in trainable_head(model).values():
            head.requires_grad_(True)
        handle = cls(model, config)
        set_handle(model, handle)
        return handle

    @classmethod
    def from_checkpoint(cls, model: nn.Module, record: CheckpointRecord) -> Lora:
        if record.source != "peft":
            return super().from_checkpoint(model, record)  # type: ignore[return-value]
        handle = cls.attach(model, LoraMethodConfig(), peft_config=record.config)
        handle.load_state_dict(record.state_dict, str(record.path))
        return handle

    def _adapters(self) -> list[BaseTunerLayer]:
        return [m for m in self.model.modules() if isinstance(m, BaseTunerLayer)]

    def state_dict(self) -> dict[str, torch.Tensor]:
        state = get_peft_model_state_dict(self.model)
        return {**{k: v.detach().cpu().contiguous() for k, v in state.items()}, **head_state_dict(self.model)}

    def load_state_dict(self, state: dict[str, torch.Tensor], where: str) -> None:
        own = {k: v for k, v in state.items() if not k.startswith(HEAD_KEY)}
        expected = get_peft_model_state_dict(self.model)
        missing = sorted(set(expected) - set(own))
        unexpected = sorted(set(own) - set(expected))
        if missing or unexpected:
            raise ValueError(
                f"lora checkpoint {where}: missing tensors {missing[:4]}{'...' if len(missing) > 4 else ''}, "
                f"unexpected tensors {unexpected[:4]}{'...' if len(unexpected) > 4 else ''} (another backbone, "
                "rank or lora_target_modules?)"
            )
        for key, value in own.items():
            if tuple(value.shape) != tuple(expected[key].shape):
                raise ValueError(
                    f"lora checkpoint {where}: {key} has shape {tuple(value.shape)}, this model expects "
                    f"{tuple(expected[key].shape)}"
                )
        set_peft_model_state_dict(self.model, own)
        load_head_state(self.model, state, where)

    @contextmanager
    def bare(self) -> Iterator[nn.Module]:
        adapters = self._adapters()
        for layer in adapters:
            layer.enable_adapters(False)
        try:
            yield self.model
        finally:
            for layer in adapters:
                layer.enable_adapters(True)


def read_peft_lora(directory: Path, meta: dict[str, Any]) -> CheckpointRecord:
    """A LoRA adapter saved by PEFT: its config and its tensors under this model's module names."""
    peft_config = LoraConfig.from_pretrained(str(directory))
    state = read_peft_weights(directory)
    # PEFT saves under the PeftModel wrapper's names and without the adapter's name.
    state = {k.removeprefix("base_model.model."): v for k, v in state.items()}
    return CheckpointRecord(Lora.name, state, "peft", directory, meta, peft_config)


register_peft_reader("LORA", read_peft_lora)
