"""Checkpoint files: reading and writing them, nothing else (attaching them to a model is the methods' job).

Every checkpoint records its method (``"method"``: ptuning_v2, prefix_tuning, ptuning_v1, prompt_tuning, lora,
full); ``checkpoint_method`` tells which without loading any tensor.

Prefix checkpoints (P-Tuning v2, Prefix-Tuning) come in three formats: ours, THUDM's official ``ptuning/`` ones,
and PEFT prefix-tuning adapters. Ours is a directory with two files:

- ``prefix_model.safetensors``: the encoder's tensors under ChatGLM's names without the ``transformer.prefix_encoder.``
  part (``embedding.weight``; with projection also ``trans.0.weight``, ``trans.0.bias``, ``trans.2.weight``,
  ``trans.2.bias``), plus ``head.<name>.*`` for the task head of a classification model;
- ``prefix_config.json``: the method, the ``PrefixConfig`` fields and the kv shape the prefix was trained for.

Every other method writes ``tuning_model.safetensors`` (what it trains, by its own names) and ``tuning_config.json``
(the method, its config, the backbone it was trained on); full fine-tuning writes a whole transformers model
directory beside ``tuning_config.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .chatglm import find_weight_files, read_weight_file
from .files import atomic_directory, json_type, read_json_object
from .prefix_encoder import KVShape, PrefixConfig

WEIGHTS_NAME = "prefix_model.safetensors"
CONFIG_NAME = "prefix_config.json"
FORMAT = "ptuning_v2.prefix"
FORMAT_VERSION = 1
HEAD_KEY = "head."
TUNING_CONFIG = "tuning_config.json"
TUNING_WEIGHTS = "tuning_model.safetensors"
TUNING_FORMAT = "ptuning_v2.tuning"
PREFIX_METHODS = ("ptuning_v2", "prefix_tuning")
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


# ---------------------------------------------------------------- reading


class CheckpointError(ValueError):
    """A prefix checkpoint that cannot be used as it is; the message names the file and the field or tensor."""


_PEFT_CONFIG = "adapter_config.json"
_PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
_OFFICIAL_CONFIG = "config.json"
# Files that sit inside a checkpoint directory: passing one of them means the directory was meant.
_CHECKPOINT_FILES = (
    WEIGHTS_NAME,
    CONFIG_NAME,
    _PEFT_CONFIG,
    *_PEFT_WEIGHTS,
    _OFFICIAL_CONFIG,
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    return read_weight_file(path, error=CheckpointError)


def _load_torch(path: Path) -> dict[str, Any]:
    return read_weight_file(path, error=CheckpointError)


def _official_weight_files(directory: Path) -> list[Path]:
    return find_weight_files(
        directory, lambda key: _OFFICIAL_KEY in key, required=False, error=CheckpointError
    )


def _read_prefix_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The ``*prefix_encoder.*`` tensors of a file, renamed to the encoder's own names."""
    found = read_weight_file(path, lambda key: _OFFICIAL_KEY in key, error=CheckpointError)
    return {key.split(_OFFICIAL_KEY, 1)[1]: value for key, value in found.items()}


def _read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, CheckpointError)


def _positive_int(meta: dict[str, Any], key: str, where: str, required: bool = True) -> int | None:
    if key not in meta or meta[key] is None:
        if required:
            raise CheckpointError(f"{where}: missing field {key!r} (a positive integer)")
        return None
    value = meta[key]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise CheckpointError(
            f"{where}: field {key!r} must be a positive integer, got {json.dumps(value)} ({json_type(value)})"
        )
    return value


def _boolean(meta: dict[str, Any], key: str, where: str, required: bool = True) -> bool | None:
    if key not in meta:
        if required:
            raise CheckpointError(f"{where}: missing field {key!r} (true or false)")
        return None
    if not isinstance(meta[key], bool):
        value = meta[key]
        raise CheckpointError(
            f"{where}: field {key!r} must be true or false, got {json.dumps(value)} ({json_type(value)})"
        )
    return meta[key]


def _check_tensors(
    state: dict[str, torch.Tensor],
    expected: dict[str, tuple[int, ...]],
    origin: dict[str, Path],
    why: str,
    optional_prefix: str | None = None,
) -> None:
    """Every expected tensor present with its shape, nothing unknown, floating point and finite.

    ``origin`` maps each tensor to the file it came from (named in every error); ``why`` says where the
    expected shapes come from; tensors under ``optional_prefix`` (task heads) are checked for dtype and
    finiteness only.
    """
    files = sorted({str(f) for f in origin.values()}) or ["the checkpoint"]
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(
                f"{origin.get(name, files[0])}: {name!r} is a {type(value).__name__}, not a tensor"
            )
    missing = [name for name in expected if name not in state]
    if missing:
        raise CheckpointError(
            f"{', '.join(files)}: missing tensor(s) {missing} ({why} needs {sorted(expected)}); "
            f"found {sorted(state)}"
        )
    unknown = [
        n for n in state if n not in expected and not (optional_prefix and n.startswith(optional_prefix))
    ]
    if unknown:
        raise CheckpointError(
            f"{', '.join(files)}: unexpected tensor(s) {sorted(unknown)} ({why} needs exactly {sorted(expected)})"
        )
    for name, tensor in state.items():
        file = origin.get(name, files[0])
        if name in expected and not _shape_fits(tuple(tensor.shape), expected[name]):
            sizes = [str(d) if d >= 0 else "?" for d in expected[name]]
            wanted = f"({sizes[0]},)" if len(sizes) == 1 else f"({', '.join(sizes)})"
            raise CheckpointError(
                f"{file}: tensor {name!r} has shape {tuple(tensor.shape)}, {why} implies {wanted}"
            )
        if not tensor.is_floating_point():
            raise CheckpointError(
                f"{file}: tensor {name!r} has dtype {str(tensor.dtype).removeprefix('torch.')}; prefix weights "
                "are floating point (float32, bfloat16 or float16)"
            )
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise CheckpointError(
                f"{file}: tensor {name!r} holds {bad} non-finite value(s) (NaN or inf) out of {tensor.numel()}: "
                "the file is corrupt or training diverged; refusing to load it"
            )


def _shape_fits(actual: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """Same rank and sizes; an expected size below 0 is unknown and matches any."""
    return len(actual) == len(expected) and all(e < 0 or a == e for a, e in zip(actual, expected))


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
    pre_seq_len = _positive_int(meta, "pre_seq_len", where)
    projection = _boolean(meta, "prefix_projection", where)
    hidden = _positive_int(meta, "prefix_hidden_size", where, required=False)
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
        _positive_int(shape, key, f"{where}: kv_shape") for key in ("num_layers", "num_kv_heads", "head_dim")
    ]
    kv_shape = KVShape(*dims, _positive_int(shape, "hidden_size", f"{where}: kv_shape"))
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
    meta = _read_json(config_file)
    if not weights.is_file():
        raise FileNotFoundError(f"{directory}: has {CONFIG_NAME} but no {WEIGHTS_NAME}")
    config, kv_shape = _our_config(meta, str(config_file))
    state = _load_safetensors(weights)
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
    _check_tensors(
        state,
        _encoder_shapes(config.pre_seq_len, kv_size, hidden),
        dict.fromkeys(state, weights),
        why,
        optional_prefix=HEAD_KEY,
    )
    return PrefixCheckpoint(config, state, kv_shape, "ptuning_v2", directory)


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
    config_file = directory / _OFFICIAL_CONFIG
    meta = _read_json(config_file) if config_file.is_file() else {}
    embedding = state["embedding.weight"]
    if not isinstance(embedding, torch.Tensor) or embedding.dim() != 2:
        shape = tuple(embedding.shape) if isinstance(embedding, torch.Tensor) else type(embedding).__name__
        raise CheckpointError(
            f"{origin['embedding.weight']}: transformer.prefix_encoder.embedding.weight must be a 2-D "
            f"(pre_seq_len, kv_size) table, got {shape}"
        )
    has_mlp = "trans.0.weight" in state
    declared = _boolean(meta, "prefix_projection", str(config_file), required=False)
    projection = has_mlp if declared is None else declared
    if projection != has_mlp:
        raise CheckpointError(
            f"{config_file} says prefix_projection={projection} but {names} "
            f"{'hold' if has_mlp else 'lack'} the MLP (transformer.prefix_encoder.trans.*)"
        )
    pre_seq_len, kv_size = embedding.shape
    declared_len = _positive_int(meta, "pre_seq_len", str(config_file), required=False)
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
    _check_tensors(state, _encoder_shapes(pre_seq_len, kv_size, hidden), origin, why)
    config = PrefixConfig(pre_seq_len=pre_seq_len, prefix_projection=projection, prefix_hidden_size=hidden)
    return PrefixCheckpoint(config, state, None, "chatglm", directory)


def _read_peft(directory: Path) -> PrefixCheckpoint:
    config_file = directory / _PEFT_CONFIG
    where = str(config_file)
    meta = _read_json(config_file)
    if "peft_type" not in meta:
        raise CheckpointError(f"{where}: missing field 'peft_type' (is this a PEFT adapter_config.json?)")
    if meta["peft_type"] != "PREFIX_TUNING":
        raise CheckpointError(f"{where}: a PEFT adapter of type {meta['peft_type']!r}, not PREFIX_TUNING")
    if (meta.get("num_transformer_submodules") or 1) != 1:
        raise CheckpointError(f"{where}: encoder-decoder PEFT prefixes are not supported")
    num_virtual_tokens = _positive_int(meta, "num_virtual_tokens", where)
    num_layers = _positive_int(meta, "num_layers", where)
    token_dim = _positive_int(meta, "token_dim", where)
    heads = _positive_int(meta, "num_attention_heads", where)
    encoder_hidden = _positive_int(meta, "encoder_hidden_size", where, required=False)
    if token_dim % heads:
        raise CheckpointError(
            f"{where}: token_dim={token_dim} is not a multiple of num_attention_heads={heads}"
        )
    if (directory / _PEFT_WEIGHTS[0]).is_file():
        weights = directory / _PEFT_WEIGHTS[0]
        state = _load_safetensors(weights)
    elif (directory / _PEFT_WEIGHTS[1]).is_file():
        weights = directory / _PEFT_WEIGHTS[1]
        state = _load_torch(weights)
    else:
        raise FileNotFoundError(f"{directory}: has {_PEFT_CONFIG} but no {' or '.join(_PEFT_WEIGHTS)}")
    if "prompt_embeddings" not in state:
        raise CheckpointError(f"{weights}: no 'prompt_embeddings' tensor (found {sorted(map(str, state))})")
    kv_shape = KVShape(num_layers, heads, token_dim // heads, encoder_hidden or token_dim)
    table = state["prompt_embeddings"]
    why = f"{where} (num_virtual_tokens={num_virtual_tokens}, kv_size={kv_shape.kv_size})"
    _check_tensors(
        {"prompt_embeddings": table},
        {"prompt_embeddings": (num_virtual_tokens, kv_shape.kv_size)},
        {"prompt_embeddings": weights},
        why,
    )
    # PEFT trains with positions offset by the prefix and without prefix dropout; keep both so outputs reproduce.
    config = PrefixConfig(
        pre_seq_len=table.shape[0], prefix_projection=False, prefix_dropout=0.0, position_convention="peft"
    )
    return PrefixCheckpoint(config, {"embedding.weight": table}, kv_shape, "peft", directory)


def load_prefix_checkpoint(path: str | Path) -> PrefixCheckpoint:
    """Read a prefix checkpoint directory in our format, THUDM's official ptuning format, or PEFT's.

    Everything is checked before it is returned: the config files' fields (types and values), the tensors'
    names and shapes against them, their dtype (floating point) and values (finite). Every error names the
    file at fault.
    """
    directory = Path(path)
    if directory.is_file():
        hint = (
            f"; pass the directory holding it, {directory.parent}"
            if directory.name in _CHECKPOINT_FILES
            else ""
        )
        raise CheckpointError(f"prefix checkpoint {directory} is a file, not a checkpoint directory{hint}")
    if not directory.is_dir():
        raise FileNotFoundError(f"prefix checkpoint {directory} does not exist or is not a directory")
    if (directory / CONFIG_NAME).is_file():
        return _read_ours(directory)
    if (directory / WEIGHTS_NAME).is_file():
        raise FileNotFoundError(
            f"{directory}: has {WEIGHTS_NAME} but no {CONFIG_NAME} (copy both files of the checkpoint)"
        )
    if (directory / _PEFT_CONFIG).is_file():
        return _read_peft(directory)
    if _official_weight_files(directory):
        return _read_official(directory)
    raise FileNotFoundError(
        f"{directory}: not a prefix checkpoint: expected {CONFIG_NAME} (ours), adapter_config.json (PEFT), or "
        "pytorch_model.bin / model.safetensors holding transformer.prefix_encoder.* (official ChatGLM ptuning)"
    )


# ---------------------------------------------------------------- loading into a model


def fits(checkpoint: PrefixCheckpoint, kv_shape: KVShape) -> bool:
    """Whether the checkpoint's table has this model's kv layout (the geometry too, when the checkpoint records it)."""
    if checkpoint.kv_size != kv_shape.kv_size:
        return False
    return checkpoint.kv_shape is None or checkpoint.kv_shape.geometry == kv_shape.geometry


# ---------------------------------------------------------------- every other method


@dataclass
class TuningCheckpoint:
    """A non-prefix method's checkpoint: its ``tuning_config.json`` and (full fine-tuning aside) its tensors."""

    method: str
    meta: dict[str, Any]
    state_dict: dict[str, torch.Tensor]
    path: Path


def write_tuning_checkpoint(
    directory: str | Path, payload: dict[str, Any], state_dict: dict[str, torch.Tensor] | None
) -> Path:
    """``tuning_config.json`` (+ ``tuning_model.safetensors`` unless None), atomically, the config last."""
    payload = {"format": TUNING_FORMAT, "format_version": FORMAT_VERSION, **payload}
    with atomic_directory(Path(directory), replace=False, last=(TUNING_CONFIG,)) as tmp:
        if state_dict is not None:
            save_file(state_dict, str(tmp / TUNING_WEIGHTS), metadata={"format": "pt"})
        (tmp / TUNING_CONFIG).write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n")
    return Path(directory)


def read_tuning_checkpoint(path: str | Path, with_weights: bool = True) -> TuningCheckpoint:
    """Read ``tuning_config.json`` and the tensors beside it; every tensor floating point and finite."""
    directory = _checkpoint_directory(path)
    config_file = directory / TUNING_CONFIG
    meta = _read_json(config_file)
    if meta.get("format", TUNING_FORMAT) != TUNING_FORMAT:
        raise CheckpointError(
            f"{config_file}: field 'format' is {json.dumps(meta['format'])}, expected {TUNING_FORMAT!r}"
        )
    version = meta.get("format_version", FORMAT_VERSION)
    if isinstance(version, bool) or not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{config_file}: format_version {json.dumps(version)}: this ptuning_v2 reads up to {FORMAT_VERSION}"
        )
    method = meta.get("method")
    if not isinstance(method, str) or not method:
        raise CheckpointError(f"{config_file}: missing field 'method' (the tuning method that wrote it)")
    state: dict[str, torch.Tensor] = {}
    weights = directory / TUNING_WEIGHTS
    if with_weights and method != "full":
        if not weights.is_file():
            raise FileNotFoundError(f"{directory}: has {TUNING_CONFIG} but no {TUNING_WEIGHTS}")
        state = _load_safetensors(weights)
        shapes = {name: tuple(tensor.shape) for name, tensor in state.items()}
        _check_tensors(state, shapes, dict.fromkeys(state, weights), f"a {method} checkpoint")
    return TuningCheckpoint(method, meta, state, directory)


def _checkpoint_directory(path: str | Path) -> Path:
    directory = Path(path)
    if directory.is_file():
        hint = (
            f"; pass the directory holding it, {directory.parent}"
            if directory.name in (*_CHECKPOINT_FILES, TUNING_CONFIG, TUNING_WEIGHTS)
            else ""
        )
        raise CheckpointError(f"checkpoint {directory} is a file, not a checkpoint directory{hint}")
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint {directory} does not exist or is not a directory")
    return directory


def checkpoint_method(path: str | Path) -> str:
    """Which method wrote the checkpoint at ``path``, from its config file alone (no tensor is read)."""
    directory = _checkpoint_directory(path)
    if (directory / TUNING_CONFIG).is_file():
        method = _read_json(directory / TUNING_CONFIG).get("method")
        if not isinstance(method, str) or not method:
            raise CheckpointError(f"{directory / TUNING_CONFIG}: missing field 'method'")
        return method
    if (directory / CONFIG_NAME).is_file():
        meta = _read_json(directory / CONFIG_NAME)
        method = meta.get("method")
        if method is None:  # written before checkpoints named their method
            return "prefix_tuning" if meta.get("prefix_projection") is True else "ptuning_v2"
        if method not in PREFIX_METHODS:
            raise CheckpointError(
                f"{directory / CONFIG_NAME}: field 'method' is {json.dumps(method)}; a prefix checkpoint is "
                f"one of {', '.join(PREFIX_METHODS)}"
            )
        return method
    if (directory / _PEFT_CONFIG).is_file():
        peft_type = _read_json(directory / _PEFT_CONFIG).get("peft_type")
        if peft_type == "LORA":
            return "lora"
    # Official ChatGLM and PEFT prefixes: load_prefix_checkpoint tells the two apart and names what is wrong.
    return "ptuning_v2"


def read_peft_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The tensors of a PEFT adapter directory (``adapter_model.safetensors`` or ``.bin``), the file named on error."""
    if (directory / _PEFT_WEIGHTS[0]).is_file():
        return _load_safetensors(directory / _PEFT_WEIGHTS[0])
    if (directory / _PEFT_WEIGHTS[1]).is_file():
        return _load_torch(directory / _PEFT_WEIGHTS[1])
    raise FileNotFoundError(f"{directory}: has {_PEFT_CONFIG} but no {' or '.join(_PEFT_WEIGHTS)}")
