"""The prefix methods' checkpoint formats: ours, THUDM's official ``ptuning/`` checkpoints and PEFT prefix-tuning
adapters, each read into a ``PrefixCheckpoint`` (a ``CheckpointRecord`` with the prefix's config and geometry).

Ours is a directory with two files:

- ``prefix_model.safetensors``: the encoder's tensors under ChatGLM's names without the ``transformer.prefix_encoder.``
  part (``embedding.weight``; with projection also ``trans.0.weight``, ``trans.0.bias``, ``trans.2.weight``,
  ``trans.2.bias``), plus ``head.<name>.*`` for the task head of a classification model;
- ``prefix_config.json``: the method, the ``PrefixConfig`` fields and the kv shape the prefix was trained for.

The readers are registered with ``checkpoint.register_format`` (PEFT's under its ``peft_type``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from ...checkpoint import (
    FORMAT_VERSION,
    HEAD_KEY,
    PEFT_CONFIG,
    PEFT_WEIGHTS,
    CheckpointError,
    CheckpointFormat,
    CheckpointRecord,
    boolean,
    check_tensors,
    load_safetensors,
    load_torch,
    positive_int,
    read_json,
    register_format,
    register_peft_reader,
)
from ...files import atomic_directory, json_type
from ...weights import find_weight_files, read_weight_file
from .config import KVShape, PrefixConfig

WEIGHTS_NAME = "prefix_model.safetensors"
CONFIG_NAME = "prefix_config.json"
FORMAT = "ptuning_v2.prefix"
OFFICIAL_KEY = "prefix_encoder."
OFFICIAL_CONFIG = "config.json"
# Files that sit inside a prefix checkpoint directory: passing one of them means the directory was meant.
PREFIX_FILES = (
    WEIGHTS_NAME,
    CONFIG_NAME,
    PEFT_CONFIG,
    *PEFT_WEIGHTS,
    OFFICIAL_CONFIG,
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)


@dataclass
class PrefixCheckpoint(CheckpointRecord):
    """A prefix read from disk, whatever format it came in; ``config`` is its ``PrefixConfig``."""

    kv_shape: KVShape | None = None  # None when the format does not record it (official, PEFT)

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
            f"prefix_hidden_size={self.hidden_size()}, {kv}"
        )

    def hidden_size(self) -> int | None:
        return self.state_dict["trans.0.weight"].shape[0] if self.config.prefix_projection else None


def prefix_method_name(config: PrefixConfig) -> str:
    """The method a prefix config is: the MLP makes it Prefix-Tuning, a plain table P-Tuning v2."""
    return "prefix_tuning" if config.prefix_projection else "ptuning_v2"


def _config_json(config: PrefixConfig, kv_shape: KVShape, extra: dict[str, Any]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "method": prefix_method_name(config),
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

    with atomic_directory(Path(directory), replace=False, last=(CONFIG_NAME,)) as tmp:
        save_file(state_dict, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    return Path(directory)


def _official_weight_files(directory: Path) -> list[Path]:
    return find_weight_files(
        directory, lambda key: OFFICIAL_KEY in key, required=False, error=CheckpointError
    )


def _read_prefix_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The ``*prefix_encoder.*`` tensors of a file, renamed to the encoder's own names."""
    found = read_weight_file(path, lambda key: OFFICIAL_KEY in key, error=CheckpointError)
    return {key.split(OFFICIAL_KEY, 1)[1]: value for key, value in found.items()}


def _record(config: PrefixConfig, state: dict, kv_shape: KVShape | None, source: str, path: Path, meta=None):
    return PrefixCheckpoint(prefix_method_name(config), state, source, path, meta or {}, config, kv_shape)


def _encoder_shapes(pre_seq_len: int, kv_size: int, hidden: int | None) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {"embedding.weight": (pre_seq_len, kv_size)}
    if hidden is not None:
        shapes.update(
            {
                "trans.0.weight": (hidden, kv_size),
                "trans.0.bias": (hidden,),
                "trans.2.weight": (kv_size, hidden),
                "trans.2.bias": (kv_size,),
            }
        )
    return shapes


def _our_config(meta: dict[str, Any], where: str) -> tuple[PrefixConfig, KVShape | None]:
    """``prefix_config.json`` -> (PrefixConfig, KVShape), each field's type and value checked first."""
    if "format" in meta and meta["format"] != FORMAT:
        raise CheckpointError(f"{where}: field 'format' is {json.dumps(meta['format'])}, expected {FORMAT!r}")
    version = meta.get("format_version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(
            f"{where}: field 'format_version' must be an integer, got {json.dumps(version)}"
        )
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{where}: format_version {version} was written by a newer ptuning_v2; this one reads up to "
            f"{FORMAT_VERSION}"
        )
    pre_seq_len = positive_int(meta, "pre_seq_len", where)
    projection = boolean(meta, "prefix_projection", where)
    hidden = positive_int(meta, "prefix_hidden_size", where, required=False)
    values: dict[str, Any] = {
        "pre_seq_len": pre_seq_len,
        "prefix_projection": projection,
        "prefix_hidden_size": hidden,
    }
    if "prefix_dropout" in meta:
        dropout = meta["prefix_dropout"]
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not 0.0 <= dropout < 1.0:
            raise CheckpointError(
                f"{where}: field 'prefix_dropout' must be a number in [0, 1), got {json.dumps(dropout)}"
            )
        values["prefix_dropout"] = float(dropout)
    if "position_convention" in meta:
        convention = meta["position_convention"]
        if convention not in ("chatglm", "peft"):
            raise CheckpointError(
                f'{where}: field \'position_convention\' must be "chatglm" or "peft", got {json.dumps(convention)}'
            )
        values["position_convention"] = convention
    method = meta.get("method", prefix_method_name(PrefixConfig(pre_seq_len=1, prefix_projection=projection)))
    if method != prefix_method_name(PrefixConfig(pre_seq_len=1, prefix_projection=projection)):
        raise CheckpointError(
            f"{where}: field 'method' is {json.dumps(method)} but prefix_projection is "
            f"{json.dumps(projection)} (ptuning_v2 has no projection MLP, prefix_tuning has one)"
        )
    try:
        config = PrefixConfig(**values)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: {err}") from err
    shape = meta.get("kv_shape")
    if shape is None:
        return config, None
    if not isinstance(shape, dict):
        raise CheckpointError(f"{where}: field 'kv_shape' must be an object, got {json_type(shape)}")
    dims = [
        positive_int(shape, key, f"{where}: kv_shape") for key in ("num_layers", "num_kv_heads", "head_dim")
    ]
    kv_shape = KVShape(*dims, positive_int(shape, "hidden_size", f"{where}: kv_shape"))
    recorded = shape.get("kv_size", kv_shape.kv_size)
    if recorded != kv_shape.kv_size:
        raise CheckpointError(
            f"{where}: kv_shape.kv_size is {json.dumps(recorded)}, but num_layers * 2 * num_kv_heads * head_dim "
            f"= {kv_shape.kv_size}"
        )
    return config, kv_shape


def _read_ours(directory: Path) -> PrefixCheckpoint:
    config_file = directory / CONFIG_NAME
    weights = directory / WEIGHTS_NAME
    meta = read_json(config_file)
    if not weights.is_file():
        raise FileNotFoundError(f"{directory}: has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    config, kv_shape = _our_config(meta, str(config_file))
    state = load_safetensors(weights)
    embedding = state.get("embedding.weight")
    if kv_shape is not None:
        kv_size = kv_shape.kv_size
    elif isinstance(embedding, torch.Tensor) and embedding.dim() == 2:
        kv_size = embedding.shape[1]
    else:
        kv_size = -1  # unknown: the shape check below reports the tensor as it is
    hidden = None
    if config.prefix_projection:
        trans = state.get("trans.0.weight")
        if config.prefix_hidden_size or kv_shape is not None:
            hidden = config.prefix_hidden_size or kv_shape.hidden_size
        elif isinstance(trans, torch.Tensor) and trans.dim() == 2:
            hidden = trans.shape[0]
        else:
            hidden = -1
    why = (
        f"{config_file} (pre_seq_len={config.pre_seq_len}, prefix_projection={config.prefix_projection}"
        + (f", kv_size={kv_size}" if kv_size > 0 else "")
        + (f", prefix hidden size {hidden}" if hidden and hidden > 0 else "")
        + ")"
    )
    check_tensors(
        state,
        _encoder_shapes(config.pre_seq_len, kv_size, hidden),
        dict.fromkeys(state, weights),
        why,
        optional_prefix=HEAD_KEY,
    )
    return _record(config, state, kv_shape, "ptuning_v2", directory, meta)


def _official_kv_size(meta: dict[str, Any]) -> int | None:
    """kv_size implied by a ChatGLM2/3 config.json's geometry, when it records it."""
    heads_key = "multi_query_group_num" if meta.get("multi_query_attention") else "num_attention_heads"
    values = [meta.get(k) for k in ("num_layers", "kv_channels", heads_key)]
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        return None
    num_layers, kv_channels, groups = values
    return num_layers * 2 * groups * kv_channels


def _read_official(directory: Path) -> PrefixCheckpoint:
    state: dict[str, torch.Tensor] = {}
    origin: dict[str, Path] = {}
    files = _official_weight_files(directory)
    for path in files:
        if not path.is_file():
            raise FileNotFoundError(f"{directory}: the index names {path.name}, which is missing")
        found = _read_prefix_tensors(path)
        state.update(found)
        origin.update(dict.fromkeys(found, path))
    names = ", ".join(str(f) for f in files)
    if "embedding.weight" not in state:
        raise CheckpointError(
            f"{names}: no prefix found: expected a tensor named transformer.prefix_encoder.embedding.weight "
            "in pytorch_model.bin or model.safetensors"
        )
    config_file = directory / OFFICIAL_CONFIG
    meta = read_json(config_file) if config_file.is_file() else {}
    embedding = state["embedding.weight"]
    if not isinstance(embedding, torch.Tensor) or embedding.dim() != 2:
        shape = tuple(embedding.shape) if isinstance(embedding, torch.Tensor) else type(embedding).__name__
        raise CheckpointError(
            f"{origin['embedding.weight']}: transformer.prefix_encoder.embedding.weight must be a 2-D "
            f"(pre_seq_len, kv_size) table, got {shape}"
        )
    has_mlp = "trans.0.weight" in state
    declared = boolean(meta, "prefix_projection", str(config_file), required=False)
    projection = has_mlp if declared is None else declared
    if projection != has_mlp:
        raise CheckpointError(
            f"{config_file} says prefix_projection={projection} but {names} "
            f"{'hold' if has_mlp else 'lack'} the MLP (transformer.prefix_encoder.trans.*)"
        )
    pre_seq_len, kv_size = embedding.shape
    declared_len = positive_int(meta, "pre_seq_len", str(config_file), required=False)
    if declared_len not in (None, pre_seq_len):
        raise CheckpointError(
            f"{config_file} says pre_seq_len={declared_len} but transformer.prefix_encoder.embedding.weight "
            f"has {pre_seq_len} rows (in {origin['embedding.weight']})"
        )
    implied = _official_kv_size(meta)
    if implied is not None and implied != kv_size:
        raise CheckpointError(
            f"{config_file}: its geometry (num_layers, kv_channels, key/value heads) implies kv_size={implied}, "
            f"but transformer.prefix_encoder.embedding.weight is {kv_size} wide (in {origin['embedding.weight']})"
        )
    hidden = None
    if has_mlp:
        trans = state["trans.0.weight"]
        hidden = trans.shape[0] if isinstance(trans, torch.Tensor) and trans.dim() == 2 else -1
    why = f"an official prefix (pre_seq_len={pre_seq_len}, kv_size={kv_size}, prefix_projection={projection})"
    check_tensors(state, _encoder_shapes(pre_seq_len, kv_size, hidden), origin, why)
    config = PrefixConfig(pre_seq_len=pre_seq_len, prefix_projection=projection, prefix_hidden_size=hidden)
    return _record(config, state, None, "chatglm", directory)


def _read_peft(directory: Path, meta: dict[str, Any]) -> PrefixCheckpoint:
    where = str(directory / PEFT_CONFIG)
    if (meta.get("num_transformer_submodules") or 1) != 1:
        raise CheckpointError(f"{where}: encoder-decoder PEFT prefixes are not supported")
    num_virtual_tokens = positive_int(meta, "num_virtual_tokens", where)
    num_layers = positive_int(meta, "num_layers", where)
    token_dim = positive_int(meta, "token_dim", where)
    heads = positive_int(meta, "num_attention_heads", where)
    encoder_hidden = positive_int(meta, "encoder_hidden_size", where, required=False)
    if token_dim % heads:
        raise CheckpointError(
            f"{where}: token_dim={token_dim} is not a multiple of num_attention_heads={heads}"
        )
    if (directory / PEFT_WEIGHTS[0]).is_file():
        weights = directory / PEFT_WEIGHTS[0]
        state = load_safetensors(weights)
    elif (directory / PEFT_WEIGHTS[1]).is_file():
        weights = directory / PEFT_WEIGHTS[1]
        state = load_torch(weights)
    else:
        raise FileNotFoundError(f"{directory}: has {PEFT_CONFIG} but no {' or '.join(PEFT_WEIGHTS)}")
    if "prompt_embeddings" not in state:
        raise CheckpointError(f"{weights}: no 'prompt_embeddings' tensor (found {sorted(map(str, state))})")
    kv_shape = KVShape(num_layers, heads, token_dim // heads, encoder_hidden or token_dim)
    table = state["prompt_embeddings"]
    why = f"{where} (num_virtual_tokens={num_virtual_tokens}, kv_size={kv_shape.kv_size})"
    check_tensors(
        {"prompt_embeddings": table},
        {"prompt_embeddings": (num_virtual_tokens, kv_shape.kv_size)},
        {"prompt_embeddings": weights},
        why,
    )
    # PEFT trains with positions offset by the prefix and without prefix dropout; keep both so outputs reproduce.
    config = PrefixConfig(
        pre_seq_len=table.shape[0], prefix_projection=False, prefix_dropout=0.0, position_convention="peft"
    )
    return _record(config, {"embedding.weight": table}, kv_shape, "peft", directory, meta)


def load_prefix_checkpoint(path: str | Path) -> PrefixCheckpoint:
    """Read a prefix checkpoint directory in our format, THUDM's official ptuning format, or PEFT's.

    Everything is checked before it is returned: the config files' fields (types and values), the tensors'
    names and shapes against them, their dtype (floating point) and values (finite). Every error names the
    file at fault.
    """
    directory = Path(path)
    if directory.is_file():
        hint = (
            f"; pass the directory holding it, {directory.parent}" if directory.name in PREFIX_FILES else ""
        )
        raise CheckpointError(f"prefix checkpoint {directory} is a file, not a checkpoint directory{hint}")
    if not directory.is_dir():
        raise FileNotFoundError(f"prefix checkpoint {directory} does not exist or is not a directory")
    if (directory / CONFIG_NAME).is_file():
        return _read_ours(directory)
    if (directory / WEIGHTS_NAME).is_file():
        _weights_without_config(directory)
    if (directory / PEFT_CONFIG).is_file():
        where = directory / PEFT_CONFIG
        meta = read_json(where)
        if "peft_type" not in meta:
            raise CheckpointError(f"{where}: missing field 'peft_type' (is this a PEFT adapter_config.json?)")
        if meta["peft_type"] != "PREFIX_TUNING":
            raise CheckpointError(f"{where}: a PEFT adapter of type {meta['peft_type']!r}, not PREFIX_TUNING")
        return _read_peft(directory, meta)
    if _official_weight_files(directory):
        return _read_official(directory)
    raise FileNotFoundError(
        f"{directory}: not a prefix checkpoint: expected {CONFIG_NAME} (ours), adapter_config.json (PEFT), or "
        "pytorch_model.bin / model.safetensors holding transformer.prefix_encoder.* (official ChatGLM ptuning)"
    )


def fits(checkpoint: PrefixCheckpoint, kv_shape: KVShape) -> bool:
    """Whether the checkpoint's table has this model's kv layout (the geometry too, when the checkpoint records it)."""
    if checkpoint.kv_size != kv_shape.kv_size:
        return False
    return checkpoint.kv_shape is None or checkpoint.kv_shape.geometry == kv_shape.geometry


def _weights_without_config(directory: Path) -> PrefixCheckpoint:
    raise FileNotFoundError(
        f"{directory}: has {WEIGHTS_NAME} but no {CONFIG_NAME} (copy both files of the checkpoint)"
    )


register_format(
    CheckpointFormat(
        "ptuning_v2.prefix",
        10,
        lambda d: (d / CONFIG_NAME).is_file(),
        _read_ours,
        f"{CONFIG_NAME} (a prefix, ours)",
        PREFIX_FILES,
    )
)
register_format(
    CheckpointFormat(
        "ptuning_v2.prefix-weights", 11, lambda d: (d / WEIGHTS_NAME).is_file(), _weights_without_config, ""
    )
)
register_peft_reader("PREFIX_TUNING", _read_peft)
register_format(
    CheckpointFormat(
        "chatglm.ptuning",
        40,
        lambda d: bool(_official_weight_files(d)),
        _read_official,
        "pytorch_model.bin / model.safetensors holding transformer.prefix_encoder.* (official ChatGLM ptuning)",
    )
)
