"""P-Tuning v2 and Prefix-Tuning: a trainable key/value prefix in every layer of a frozen decoder.

One encoder with a switch (``PrefixConfig.prefix_projection``): without it (``ptuning_v2``) the prefix is a plain
table, one trainable key/value table per layer; with it (``prefix_tuning``) the table comes out of a 2-layer MLP.
The prefix reaches the layers through the cache (``hook.py``); its checkpoint keeps THUDM's tensor names
(``formats.py``); ``config.py`` and ``encoder.py`` define its settings, geometry and table.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ...checkpoint import HEAD_KEY
from ...deprecated import add_model_aliases
from ...files import atomic_directory
from ..base import TuningMethod, base_model_info, head_state_dict, load_head_state, set_handle, trainable_head
from .config import PrefixConfig, kv_shape_from_config
from .encoder import PrefixEncoder
from .formats import (
    PrefixCheckpoint,
    fits,
    load_prefix_checkpoint,
    prefix_method_name,
    write_prefix_checkpoint,
)
from .hook import check_prefix_fits_model, install_prefix_hook


class PrefixMethod(TuningMethod):
    """The handle of an attached prefix: ``model.tuning.encoder`` computes it, ``model.tuning.config`` sizes it."""

    config_class = PrefixConfig

    def __init__(self, model: nn.Module, config: PrefixConfig, encoder: PrefixEncoder, cache_argument: str):
        super().__init__(model, config)
        self.encoder = encoder
        self.cache_argument = cache_argument  # `cache` (transformers 5.24) or `past_key_values`

    @property
    def name(self) -> str:  # type: ignore[override]
        return prefix_method_name(self.config)

    @classmethod
    def attach(cls, model: nn.Module, config: PrefixConfig, tokenizer: Any = None) -> PrefixMethod:
        cache_argument = check_prefix_fits_model(model, config)
        kv_shape = kv_shape_from_config(model.config)  # refuses geometries one table cannot hold
        model.requires_grad_(False)
        for head in trainable_head(model).values():
            head.requires_grad_(True)
        device = model.get_input_embeddings().weight.device
        encoder = PrefixEncoder(config, kv_shape).to(device=device, dtype=torch.float32)
        # A new module starts in training mode: follow the model. Registered as a submodule (named as in
        # ChatGLM's `transformer.prefix_encoder`) so the optimizer, `.to()` and DeepSpeed see its parameters.
        model.prefix_encoder = encoder.train(model.training)
        handle = cls(model, config, encoder, cache_argument)
        set_handle(model, handle)
        install_prefix_hook(model)
        add_model_aliases(model)  # model.save_prefix(dir), deprecated
        return handle

    def set_encoder(self, encoder: PrefixEncoder) -> None:
        self.model.prefix_encoder = encoder
        self.encoder, self.config = encoder, encoder.config

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's tensors, plus the task head of a classification model."""
        state = {k: v.detach().cpu().contiguous() for k, v in self.encoder.state_dict().items()}
        return {**state, **head_state_dict(self.model)}

    def load_state_dict(self, state: dict[str, torch.Tensor], where: str) -> None:
        encoder_state = {k: v for k, v in state.items() if not k.startswith(HEAD_KEY)}
        result = self.encoder.load_state_dict(encoder_state, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"prefix checkpoint {where}: missing tensors {result.missing_keys}, "
                f"unexpected tensors {result.unexpected_keys}"
            )
        load_head_state(self.model, state, where)

    def save(self, directory: str | Path) -> Path:
        extra = {
            "base_model": base_model_info(self.model),
            "baked_from_projection": getattr(self.encoder, "baked_from_projection", False),
        }
        return write_prefix_checkpoint(
            directory, self.config, self.encoder.kv_shape, self.state_dict(), extra
        )

    def kv_table(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return self.encoder.kv_table()

    @classmethod
    def from_checkpoint(cls, model: nn.Module, record: PrefixCheckpoint) -> PrefixMethod:
        model_shape = kv_shape_from_config(model.config)
        # Checked before attaching, so a checkpoint that does not fit leaves the model untouched.
        if not fits(record, model_shape):
            raise ValueError(
                f"prefix checkpoint {record.path} does not fit this model: checkpoint has {record.describe()}; "
                f"model expects {model_shape.describe()}"
            )
        attach_prefix(model, record.config)
        load_prefix_weights(model, record)
        return model.tuning

    @classmethod
    def checkpoint_table(
        cls, backbone: nn.Module, record: PrefixCheckpoint
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        encoder = PrefixEncoder(record.config, kv_shape_from_config(backbone.config))
        return load_prefix_into_encoder(record, encoder).kv_table()


def attach_prefix(model: nn.Module, config: PrefixConfig) -> nn.Module:
    """Freeze ``model`` and attach a trainable prefix; returns the same model object, now prefix-aware.

    The model keeps behaving as a transformers model (forward, ``generate``, gradient checkpointing) and gains
    ``model.tuning``, the prefix's handle (``.encoder``, ``.config``, ``.save(dir)``, ``.bare()``).
    """
    PrefixMethod.attach(model, config)
    return model


def _mismatch(checkpoint: PrefixCheckpoint, encoder: PrefixEncoder) -> str | None:
    expected = encoder.kv_shape
    problems = []
    if checkpoint.config.pre_seq_len != encoder.config.pre_seq_len:
        problems.append("pre_seq_len")
    if checkpoint.config.prefix_projection != encoder.config.prefix_projection:
        problems.append("prefix_projection")
    if not fits(checkpoint, expected):
        problems.append("kv shape")
    if not problems and checkpoint.config.prefix_projection:
        if checkpoint.hidden_size() != encoder.trans[0].out_features:
            problems.append("prefix_hidden_size")
    if not problems:
        return None
    hidden = encoder.trans[0].out_features if encoder.config.prefix_projection else None
    return (
        f"prefix checkpoint {checkpoint.path} does not fit this model ({', '.join(problems)} differ): "
        f"checkpoint has {checkpoint.describe()}; model expects pre_seq_len={encoder.config.pre_seq_len}, "
        f"prefix_projection={encoder.config.prefix_projection}, prefix_hidden_size={hidden}, {expected.describe()}"
    )


def load_prefix_weights(model: nn.Module, checkpoint: PrefixCheckpoint) -> nn.Module:
    """Copy a checkpoint's tensors into the prefix attached to ``model``; every mismatch is named."""
    handle: PrefixMethod = model.tuning
    problem = _mismatch(checkpoint, handle.encoder)
    if problem:
        raise ValueError(problem)
    handle.load_state_dict(checkpoint.state_dict, str(checkpoint.path))
    return model


def load_prefix_into_encoder(checkpoint: PrefixCheckpoint, encoder: PrefixEncoder) -> PrefixEncoder:
    """A checkpoint's encoder tensors into a bare encoder (the serving engine's tables); mismatches named."""
    problem = _mismatch(checkpoint, encoder)
    if problem:
        raise ValueError(problem)
    encoder_state = {k: v for k, v in checkpoint.state_dict.items() if not k.startswith(HEAD_KEY)}
    encoder.load_state_dict(encoder_state)
    return encoder


def load_prefix(model: nn.Module, path: str | Path) -> nn.Module:
    """Attach the prefix stored at ``path`` (ours, official ChatGLM or PEFT) to ``model`` and load its weights."""
    PrefixMethod.from_checkpoint(model, load_prefix_checkpoint(path))
    return model


def bake_prefix(model: nn.Module) -> nn.Module:
    """Replace a projection prefix by the plain table it computes: same outputs, no MLP, smaller file."""
    handle: PrefixMethod = model.tuning
    encoder = handle.encoder
    if not encoder.config.prefix_projection:
        return model
    with torch.no_grad():
        table = encoder.table().detach().float()
    config = PrefixConfig(
        **{**encoder.config.to_dict(), "prefix_projection": False, "prefix_hidden_size": None}
    )
    baked = PrefixEncoder(config, encoder.kv_shape).to(device=table.device)
    with torch.no_grad():
        baked.embedding.weight.copy_(table)
    baked.baked_from_projection = True
    baked.requires_grad_(encoder.embedding.weight.requires_grad)
    baked.train(encoder.training)
    handle.set_encoder(baked)
    return model


def export_peft_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Write the prefix as a PEFT prefix-tuning adapter directory (a baked table: PEFT stores only that).

    PEFT feeds real tokens from position ``pre_seq_len``; a prefix trained with the ChatGLM convention will not
    reproduce exactly there.
    """
    from peft import PrefixTuningConfig

    encoder: PrefixEncoder = model.tuning.encoder
    shape = encoder.kv_shape
    with torch.no_grad():
        table = encoder.table().detach().float().cpu().contiguous()
    peft_config = PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=encoder.config.pre_seq_len,
        token_dim=shape.num_kv_heads * shape.head_dim,
        num_attention_heads=shape.num_kv_heads,
        num_layers=shape.num_layers,
        encoder_hidden_size=shape.num_kv_heads * shape.head_dim,
        num_transformer_submodules=1,
        prefix_projection=False,
        inference_mode=True,
        base_model_name_or_path=getattr(model.config, "_name_or_path", None) or None,
    )
    with atomic_directory(Path(directory), replace=False) as tmp:
        peft_config.save_pretrained(str(tmp))
        save_file(
            {"prompt_embeddings": table}, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"}
        )
    return Path(directory)
