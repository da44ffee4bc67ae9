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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
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


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    names = {dict: "object", list: "array", str: "string", int: "integer", float: "number"}
    return names.get(type(value), type(value).__name__)


def read_json_object(path: Path, error: type[Exception] = ValueError) -> dict[str, Any]:
    """A JSON object from ``path``; every problem (encoding, syntax, not an object) is an ``error`` naming the file."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise error(f"{path}: not UTF-8 text (byte {err.start}); is this really a JSON file?") from err
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise error(
            f"{path}:{err.lineno}: not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
        ) from err
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object, got {_json_type(value)}")
    return value


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
            f"{where}: field {key!r} must be a positive integer, got {json.dumps(value)} ({_json_type(value)})"
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
            f"{where}: field {key!r} must be true or false, got {json.dumps(value)} ({_json_type(value)})"
        )
    return meta[key]


def _describe_error(err: BaseException) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _load_safetensors(path: Path, select: Any = None) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file (those whose name ``select`` accepts); a broken file is named."""
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {key: f.get_tensor(key) for key in f.keys() if select is None or select(key)}
    except (SafetensorError, OSError, RuntimeError) as err:
        raise CheckpointError(
            f"{path}: cannot read this safetensors file ({_describe_error(err)}); it is truncated or corrupt "
            "(an interrupted copy or download?)"
        ) from err


def _load_torch(path: Path) -> dict[str, Any]:
    """A ``torch.save``-d state dict; a broken or foreign file is named."""
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # torch raises RuntimeError, UnpicklingError, EOFError... for a bad file
        raise CheckpointError(
            f"{path}: cannot read this PyTorch file ({_describe_error(err)}); it is truncated, corrupt or "
            "not a state dict saved with torch.save"
        ) from err
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: holds a {type(state).__name__}, not a state dict of named tensors")
    return state


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
    try:
        config = PrefixConfig(**values)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{where}: {err}") from err
    shape = meta.get("kv_shape")
    if shape is None:
        return config, None
    if not isinstance(shape, dict):
        raise CheckpointError(f"{where}: field 'kv_shape' must be an object, got {_json_type(shape)}")
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


def _official_weight_files(directory: Path) -> list[Path]:
    for index_name, single in (
        ("model.safetensors.index.json", "model.safetensors"),
        ("pytorch_model.bin.index.json", "pytorch_model.bin"),
    ):
        index = directory / index_name
        if index.is_file():
            weight_map = _read_json(index).get("weight_map", {})
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise CheckpointError(f"{index}: field 'weight_map' must map tensor names to file names")
            files = sorted({f for k, f in weight_map.items() if _OFFICIAL_KEY in k})
            return [directory / f for f in files]
        if (directory / single).is_file():
            return [directory / single]
    return []


def _read_prefix_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The ``*prefix_encoder.*`` tensors of a file, renamed to the encoder's own names."""
    if path.suffix == ".safetensors":
        found = _load_safetensors(path, select=lambda key: _OFFICIAL_KEY in key)
        return {k.split(_OFFICIAL_KEY, 1)[1]: v for k, v in found.items()}
    state = _load_torch(path)
    return {
        str(k).split(_OFFICIAL_KEY, 1)[1]: v.clone() if isinstance(v, torch.Tensor) else v
        for k, v in state.items()
        if _OFFICIAL_KEY in str(k)
    }


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
