"""Prefix checkpoints: ours, THUDM's official ``ptuning/`` ones, and PEFT prefix-tuning adapters.

Our format is a directory with two files:

- ``prefix_model.safetensors``: the encoder's tensors under ChatGLM's names without the ``transformer.prefix_encoder.``
  part (``embedding.weight``; with projection also ``trans.0.weight``, ``trans.0.bias``, ``trans.2.weight``,
  ``trans.2.bias``), plus ``head.<name>.*`` for the task head of a classification model;
- ``prefix_config.json``: the ``PrefixConfig`` fields and the kv shape the prefix was trained for.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from .attach import trainable_head
from .prefix_encoder import KVShape, PrefixConfig, PrefixEncoder, kv_shape_from_config

WEIGHTS_NAME = "prefix_model.safetensors"
CONFIG_NAME = "prefix_config.json"
FORMAT = "ptuning_v2.prefix"
FORMAT_VERSION = 1
HEAD_KEY = "head."
_OFFICIAL_KEY = "prefix_encoder."


@dataclass
class PrefixCheckpoint:
    """A prefix read from disk, whatever format it came in."""

    config: PrefixConfig
    state_dict: dict[str, torch.Tensor]
    kv_shape: KVShape | None  # None when the format does not record it (official, PEFT)
    source: str  # "ptuning_v2", "chatglm" or "peft"
    path: Path

    @property
    def kv_size(self) -> int:
        weight = (
            self.state_dict["trans.2.weight"]
            if self.config.prefix_projection
            else self.state_dict["embedding.weight"]
        )
        return weight.shape[0] if self.config.prefix_projection else weight.shape[1]

    def describe(self) -> str:
        kv = self.kv_shape.describe() if self.kv_shape else f"kv_size={self.kv_size}"
        return (
            f"pre_seq_len={self.config.pre_seq_len}, prefix_projection={self.config.prefix_projection}, "
            f"prefix_hidden_size={self._hidden_size()}, {kv}"
        )

    def _hidden_size(self) -> int | None:
        return self.state_dict["trans.0.weight"].shape[0] if self.config.prefix_projection else None


# ---------------------------------------------------------------- writing


def _atomic_write_dir(directory: Path, write: Any) -> Path:
    """Write files with ``write(tmp_dir)`` and move them into ``directory`` so readers never see half a file."""
    directory.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-prefix-", dir=directory))
    try:
        write(tmp)
        # Weights first: a reader that finds the config finds matching weights.
        for name in sorted(os.listdir(tmp), key=lambda n: n == CONFIG_NAME):
            os.replace(tmp / name, directory / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return directory


def prefix_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """What a prefix checkpoint holds: the encoder, plus the task head of a classification model."""
    state = {k: v.detach().cpu().contiguous() for k, v in model.prefix_encoder.state_dict().items()}
    for name, head in trainable_head(model).items():
        for key, value in head.state_dict().items():
            state[f"{HEAD_KEY}{name}.{key}"] = value.detach().cpu().contiguous()
    return state


def _config_json(config: PrefixConfig, kv_shape: KVShape, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        **config.to_dict(),
        "kv_shape": {
            "num_layers": kv_shape.num_layers,
            "num_kv_heads": kv_shape.num_kv_heads,
            "head_dim": kv_shape.head_dim,
            "hidden_size": kv_shape.hidden_size,
            "kv_size": kv_shape.kv_size,
        },
        **extra,
    }


def write_prefix_checkpoint(
    directory: str | Path,
    config: PrefixConfig,
    kv_shape: KVShape,
    state_dict: dict[str, torch.Tensor],
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write a prefix checkpoint in our format (atomically, file by file)."""
    payload = _config_json(config, kv_shape, extra or {})

    def write(tmp: Path) -> None:
        save_file(state_dict, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")

    return _atomic_write_dir(Path(directory), write)


def save_prefix_checkpoint(model: nn.Module, directory: str | Path) -> Path:
    """``model.save_prefix(dir)``: the trainable prefix only, never the backbone."""
    encoder: PrefixEncoder = model.prefix_encoder
    extra = {
        "base_model": {
            "model_type": getattr(model.config, "model_type", None),
            "name_or_path": getattr(model.config, "_name_or_path", None),
            "architecture": type(model).__name__,
        },
        "baked_from_projection": getattr(encoder, "baked_from_projection", False),
    }
    return write_prefix_checkpoint(
        directory, encoder.config, encoder.kv_shape, prefix_state_dict(model), extra
    )


# ---------------------------------------------------------------- reading


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err


def _read_ours(directory: Path) -> PrefixCheckpoint:
    meta = _read_json(directory / CONFIG_NAME)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{directory}: has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    known = {f.name for f in fields(PrefixConfig)}
    try:
        config = PrefixConfig(**{k: v for k, v in meta.items() if k in known})
    except (TypeError, ValueError) as err:
        raise ValueError(f"{directory / CONFIG_NAME}: {err}") from err
    shape = meta.get("kv_shape")
    kv_shape = None
    if shape:
        kv_shape = KVShape(
            shape["num_layers"], shape["num_kv_heads"], shape["head_dim"], shape["hidden_size"]
        )
    return PrefixCheckpoint(config, load_file(str(weights)), kv_shape, "ptuning_v2", directory)


def _official_weight_files(directory: Path) -> list[Path]:
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = directory / index_name
        if index.is_file():
            weight_map = _read_json(index).get("weight_map", {})
            files = sorted({f for k, f in weight_map.items() if _OFFICIAL_KEY in k})
            return [directory / f for f in files]
        if (directory / single).is_file():
            return [directory / single]
    return []


def _read_prefix_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The ``*prefix_encoder.*`` tensors of a file, renamed to the encoder's own names."""
    found: dict[str, torch.Tensor] = {}
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                if _OFFICIAL_KEY in key:
                    found[key.split(_OFFICIAL_KEY, 1)[1]] = f.get_tensor(key)
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        found = {k.split(_OFFICIAL_KEY, 1)[1]: v.clone() for k, v in state.items() if _OFFICIAL_KEY in k}
    return found


def _read_official(directory: Path) -> PrefixCheckpoint:
    state: dict[str, torch.Tensor] = {}
    for path in _official_weight_files(directory):
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: the index names {path.name}, which is missing")
        state.update(_read_prefix_tensors(path))
    if "embedding.weight" not in state:
        raise ValueError(
            f"{directory}: no prefix found: expected a tensor named transformer.prefix_encoder.embedding.weight "
            "in pytorch_model.bin or model.safetensors"
        )
    meta = _read_json(directory / "config.json") if (directory / "config.json").is_file() else {}
    has_mlp = "trans.0.weight" in state
    projection = bool(meta.get("prefix_projection", has_mlp))
    if projection != has_mlp:
        raise ValueError(
            f"{directory}: config.json says prefix_projection={projection} but the weights "
            f"{'hold' if has_mlp else 'lack'} the MLP (transformer.prefix_encoder.trans.*)"
        )
    pre_seq_len = state["embedding.weight"].shape[0]
    if meta.get("pre_seq_len") not in (None, pre_seq_len):
        raise ValueError(
            f"{directory}: config.json says pre_seq_len={meta['pre_seq_len']} but "
            f"transformer.prefix_encoder.embedding.weight has {pre_seq_len} rows"
        )
    hidden = state["trans.0.weight"].shape[0] if has_mlp else None
    config = PrefixConfig(pre_seq_len=pre_seq_len, prefix_projection=projection, prefix_hidden_size=hidden)
    return PrefixCheckpoint(config, state, None, "chatglm", directory)


def _read_peft(directory: Path) -> PrefixCheckpoint:
    meta = _read_json(directory / "adapter_config.json")
    if meta.get("peft_type") != "PREFIX_TUNING":
        raise ValueError(f"{directory}: a PEFT adapter of type {meta.get('peft_type')!r}, not PREFIX_TUNING")
    if (meta.get("num_transformer_submodules") or 1) != 1:
        raise ValueError(f"{directory}: encoder-decoder PEFT prefixes are not supported")
    if (directory / "adapter_model.safetensors").is_file():
        state = load_file(str(directory / "adapter_model.safetensors"))
    elif (directory / "adapter_model.bin").is_file():
        state = torch.load(str(directory / "adapter_model.bin"), map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{directory}: no adapter_model.safetensors or adapter_model.bin")
    if "prompt_embeddings" not in state:
        raise ValueError(f"{directory}: no 'prompt_embeddings' tensor (found {sorted(state)})")
    table = state["prompt_embeddings"]
    num_layers, token_dim, heads = meta["num_layers"], meta["token_dim"], meta["num_attention_heads"]
    kv_shape = KVShape(num_layers, heads, token_dim // heads, meta.get("encoder_hidden_size") or token_dim)
    if table.shape != (meta["num_virtual_tokens"], kv_shape.kv_size):
        raise ValueError(
            f"{directory}: prompt_embeddings has shape {tuple(table.shape)}, adapter_config.json implies "
            f"({meta['num_virtual_tokens']}, {kv_shape.kv_size})"
        )
    # PEFT trains with positions offset by the prefix and without prefix dropout; keep both so outputs reproduce.
    config = PrefixConfig(
        pre_seq_len=table.shape[0], prefix_projection=False, prefix_dropout=0.0, position_convention="peft"
    )
    return PrefixCheckpoint(config, {"embedding.weight": table}, kv_shape, "peft", directory)


def load_prefix_checkpoint(path: str | Path) -> PrefixCheckpoint:
    """Read a prefix checkpoint directory in our format, THUDM's official ptuning format, or PEFT's."""
    directory = Path(path)
    if not directory.is_dir():
        raise FileNotFoundError(f"prefix checkpoint {directory} does not exist or is not a directory")
    if (directory / CONFIG_NAME).is_file():
        return _read_ours(directory)
    if (directory / "adapter_config.json").is_file():
        return _read_peft(directory)
    if _official_weight_files(directory):
        return _read_official(directory)
    raise FileNotFoundError(
        f"{directory}: not a prefix checkpoint: expected {CONFIG_NAME} (ours), adapter_config.json (PEFT), or "
        "pytorch_model.bin / model.safetensors holding transformer.prefix_encoder.* (official ChatGLM ptuning)"
    )


# ---------------------------------------------------------------- loading into a model


def _fits(checkpoint: PrefixCheckpoint, kv_shape: KVShape) -> bool:
    """Whether the checkpoint's table has this model's kv layout (the geometry too, when the checkpoint records it)."""
    if checkpoint.kv_size != kv_shape.kv_size:
        return False
    return checkpoint.kv_shape is None or checkpoint.kv_shape.geometry == kv_shape.geometry


def _mismatch(checkpoint: PrefixCheckpoint, model: nn.Module) -> str | None:
    encoder: PrefixEncoder = model.prefix_encoder
    expected = encoder.kv_shape
    problems = []
    if checkpoint.config.pre_seq_len != encoder.config.pre_seq_len:
        problems.append("pre_seq_len")
    if checkpoint.config.prefix_projection != encoder.config.prefix_projection:
        problems.append("prefix_projection")
    if not _fits(checkpoint, expected):
        problems.append("kv shape")
    if not problems and checkpoint.config.prefix_projection:
        if checkpoint._hidden_size() != encoder.trans[0].out_features:
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
    problem = _mismatch(checkpoint, model)
    if problem:
        raise ValueError(problem)
    encoder_state = {k: v for k, v in checkpoint.state_dict.items() if not k.startswith(HEAD_KEY)}
    result = model.prefix_encoder.load_state_dict(encoder_state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(
            f"prefix checkpoint {checkpoint.path}: missing tensors {result.missing_keys}, "
            f"unexpected tensors {result.unexpected_keys}"
        )
    heads = trainable_head(model)
    for key, value in checkpoint.state_dict.items():
        if not key.startswith(HEAD_KEY):
            continue
        name, param = key[len(HEAD_KEY) :].split(".", 1)
        if name not in heads:
            raise ValueError(
                f"prefix checkpoint {checkpoint.path} holds a task head '{name}' this model lacks"
            )
        target = heads[name].get_parameter(param)
        if target.shape != value.shape:
            raise ValueError(
                f"prefix checkpoint {checkpoint.path}: {key} has shape {tuple(value.shape)}, "
                f"model expects {tuple(target.shape)} (a different number of labels?)"
            )
        with torch.no_grad():
            target.copy_(value)
    return model


# ---------------------------------------------------------------- bake and export


def bake_prefix(model: nn.Module) -> nn.Module:
    """Replace a projection prefix by the plain table it computes: same outputs, no MLP, smaller file."""
    encoder: PrefixEncoder = model.prefix_encoder
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
    model.prefix_encoder = baked
    model.prefix_config = config
    return model


def export_peft_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Write the prefix as a PEFT prefix-tuning adapter directory (a baked table: PEFT stores only that).

    PEFT feeds real tokens from position ``pre_seq_len``; a prefix trained with the ChatGLM convention will not
    reproduce exactly there.
    """
    from peft import PrefixTuningConfig

    encoder: PrefixEncoder = model.prefix_encoder
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

    def write(tmp: Path) -> None:
        peft_config.save_pretrained(str(tmp))
        save_file(
            {"prompt_embeddings": table}, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"}
        )

    return _atomic_write_dir(Path(directory), write)


def load_prefix(model: nn.Module, path: str | Path) -> nn.Module:
    """Attach the prefix stored at ``path`` (any supported format) to ``model`` and load its weights."""
    from .attach import attach_prefix

    checkpoint = load_prefix_checkpoint(path)
    model_shape = kv_shape_from_config(model.config)
    # Checked before attaching, so a checkpoint that does not fit leaves the model untouched.
    if not _fits(checkpoint, model_shape):
        raise ValueError(
            f"prefix checkpoint {checkpoint.path} does not fit this model: checkpoint has {checkpoint.describe()}; "
            f"model expects {model_shape.describe()}"
        )
    attach_prefix(model, checkpoint.config)
    return load_prefix_weights(model, checkpoint)
