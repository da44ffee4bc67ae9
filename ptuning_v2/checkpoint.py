"""Checkpoint files: each is read once into one record, ``CheckpointRecord`` (method, settings, tensors, format).

A format is a reader registered here with ``register_format``: ours (``tuning_config.json`` +
``tuning_model.safetensors``, any method; registered by ``methods.base``), the prefix methods' own three
(``methods/prefix/formats.py``: ours, THUDM's official ptuning and PEFT prefix-tuning adapters) and PEFT LoRA
adapters (``methods/lora.py``). A PEFT ``adapter_config.json`` is read once here and handed to the reader of its
``peft_type``. Attaching a record to a model is the methods' job; this module only reads and writes files.

Every tensor is checked as it is read (floating point, finite) and every error names the file at fault.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from .files import atomic_directory, json_type, read_json_object
from .weights import read_weight_file

FORMAT_VERSION = 1
HEAD_KEY = "head."
TUNING_CONFIG = "tuning_config.json"
TUNING_WEIGHTS = "tuning_model.safetensors"
TUNING_FORMAT = "ptuning_v2.tuning"
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used as it is; the message names the file and the field or tensor."""


@dataclass
class CheckpointRecord:
    """A checkpoint read from disk, whatever format it came in; what every loader takes."""

    method: str
    state_dict: dict[str, torch.Tensor]
    source: str  # the format it was read from: "ptuning_v2" (ours), "chatglm" (THUDM's ptuning) or "peft"
    path: Path
    meta: dict[str, Any] = field(default_factory=dict)  # the config file's fields
    config: Any = None  # the method's config, where the format yields one (prefixes, a PEFT adapter's)


@dataclass(frozen=True)
class CheckpointFormat:
    name: str
    order: int  # formats are asked in this order whether a directory is theirs
    claims: Callable[[Path], bool]
    read: Callable[[Path], CheckpointRecord]
    expects: str  # what it looks for, for the message when no format claims a directory
    files: tuple[str, ...] = ()  # the files it is made of (passing one of them means the directory was meant)


FORMATS: list[CheckpointFormat] = []
PEFT_READERS: dict[str, Callable[[Path, dict[str, Any]], CheckpointRecord]] = {}
CHECKPOINT_FILES: set[str] = {TUNING_CONFIG, TUNING_WEIGHTS, PEFT_CONFIG, *PEFT_WEIGHTS}


def register_format(fmt: CheckpointFormat) -> None:
    FORMATS[:] = sorted([f for f in FORMATS if f.name != fmt.name] + [fmt], key=lambda f: f.order)
    CHECKPOINT_FILES.update(fmt.files)


def register_peft_reader(peft_type: str, read: Callable[[Path, dict[str, Any]], CheckpointRecord]) -> None:
    """The reader of PEFT adapters of ``peft_type``; it gets the directory and its parsed adapter_config.json."""
    PEFT_READERS[peft_type] = read


def read_registered(path: str | Path) -> CheckpointRecord:
    """The record of the checkpoint at ``path``, read by the first registered format that claims it."""
    directory = checkpoint_directory(path)
    for fmt in FORMATS:
        if fmt.claims(directory):
            return fmt.read(directory)
    raise FileNotFoundError(
        f"{directory}: not a checkpoint: expected {'; '.join(f.expects for f in FORMATS if f.expects)}"
    )


def read_peft(directory: Path) -> CheckpointRecord:
    """A PEFT adapter directory, handed to the reader of its ``peft_type``."""
    config_file = directory / PEFT_CONFIG
    meta = read_json(config_file)
    if "peft_type" not in meta:
        raise CheckpointError(
            f"{config_file}: missing field 'peft_type' (is this a PEFT adapter_config.json?)"
        )
    read = PEFT_READERS.get(meta["peft_type"])
    if read is None:
        raise CheckpointError(
            f"{config_file}: a PEFT adapter of type {meta['peft_type']!r}, not one of {', '.join(PEFT_READERS)}"
        )
    return read(directory, meta)


register_format(
    CheckpointFormat(
        "peft", 30, lambda d: (d / PEFT_CONFIG).is_file(), read_peft, f"{PEFT_CONFIG} (a PEFT adapter)"
    )
)


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    return read_weight_file(path, error=CheckpointError)


def load_torch(path: Path) -> dict[str, Any]:
    return read_weight_file(path, error=CheckpointError)


def read_json(path: Path) -> dict[str, Any]:
    return read_json_object(path, CheckpointError)


def positive_int(meta: dict[str, Any], key: str, where: str, required: bool = True) -> int | None:
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


def boolean(meta: dict[str, Any], key: str, where: str, required: bool = True) -> bool | None:
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


def check_tensors(
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
        if name in expected and not shape_fits(tuple(tensor.shape), expected[name]):
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


def shape_fits(actual: tuple[int, ...], expected: tuple[int, ...]) -> bool:
    """Same rank and sizes; an expected size below 0 is unknown and matches any."""
    return len(actual) == len(expected) and all(e < 0 or a == e for a, e in zip(actual, expected))


# ---------------------------------------------------------------- our format, any method


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


def read_tuning_checkpoint(directory: Path, holds_weights: Callable[[str], bool]) -> CheckpointRecord:
    """Read ``tuning_config.json`` and the tensors beside it (when ``holds_weights(method)``; a whole-model
    checkpoint holds none of its own); every tensor floating point and finite."""
    config_file = directory / TUNING_CONFIG
    meta = read_json(config_file)
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
    if holds_weights(method):
        if not weights.is_file():
            raise FileNotFoundError(f"{directory}: has {TUNING_CONFIG} but no {TUNING_WEIGHTS}")
        state = load_safetensors(weights)
        shapes = {name: tuple(tensor.shape) for name, tensor in state.items()}
        check_tensors(state, shapes, dict.fromkeys(state, weights), f"a {method} checkpoint")
    return CheckpointRecord(method, state, "ptuning_v2", directory, meta)


def checkpoint_directory(path: str | Path) -> Path:
    directory = Path(path)
    if directory.is_file():
        hint = (
            f"; pass the directory holding it, {directory.parent}"
            if directory.name in CHECKPOINT_FILES
            else ""
        )
        raise CheckpointError(f"checkpoint {directory} is a file, not a checkpoint directory{hint}")
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint {directory} does not exist or is not a directory")
    return directory


def read_peft_weights(directory: Path) -> dict[str, torch.Tensor]:
    """The tensors of a PEFT adapter directory (``adapter_model.safetensors`` or ``.bin``), the file named on error."""
    if (directory / PEFT_WEIGHTS[0]).is_file():
        return load_safetensors(directory / PEFT_WEIGHTS[0])
    if (directory / PEFT_WEIGHTS[1]).is_file():
        return load_torch(directory / PEFT_WEIGHTS[1])
    raise FileNotFoundError(f"{directory}: has {PEFT_CONFIG} but no {' or '.join(PEFT_WEIGHTS)}")
