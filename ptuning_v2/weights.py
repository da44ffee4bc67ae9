"""Checkpoint weight files, read in one place: ChatGLM backbones, official ptuning prefixes, our checkpoints and PEFT
adapters all go through here.

Which files a directory's weights are in, and the tensors of one file, selected by name. A file that cannot be read
is an error naming it (``error``: the caller's error class, so each format reports in its own terms).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from .files import read_json_object


class WeightFileError(ValueError):
    """A weights file or index that cannot be read; the message names it."""


# Looked for in this order: safetensors before PyTorch pickles (as transformers does), an index before a single file.
WEIGHT_INDEX_FILES = {
    "model.safetensors": "model.safetensors.index.json",
    "pytorch_model.bin": "pytorch_model.bin.index.json",
}


def find_weight_files(
    directory: str | os.PathLike,
    select: Callable[[str], bool] | None = None,
    *,
    required: bool = True,
    error: type[Exception] = WeightFileError,
) -> list[Path]:
    """The weight files of a checkpoint directory: the shards its index lists (in index order), or the single file.

    Looks for ``model.safetensors.index.json``, ``model.safetensors``, ``pytorch_model.bin.index.json`` and
    ``pytorch_model.bin``, in that order. With an index and ``select``, only the shards holding a tensor whose name
    ``select`` accepts. No weights at all: ``[]`` unless ``required``, which raises. A bad index, or a shard it
    lists that is missing, raises ``error`` naming the index (and the shard).
    """
    root = Path(directory)
    for single, index_name in WEIGHT_INDEX_FILES.items():
        index_file = root / index_name
        if index_file.is_file():
            weight_map = read_json_object(index_file, error).get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise error(
                    f"{index_file}: field 'weight_map' must be an object mapping tensor names to file names"
                )
            shards = list(dict.fromkeys(f for k, f in weight_map.items() if select is None or select(k)))
            missing = [s for s in shards if not (root / s).is_file()]
            if missing:
                raise error(f"{index_file}: shard file(s) listed in the index are missing: {missing}")
            return [root / s for s in shards]
        if (root / single).is_file():
            return [root / single]
    if not required:
        return []
    looked_for = [name for pair in WEIGHT_INDEX_FILES.items() for name in reversed(pair)]
    raise error(f"{root}: no weights found (looked for {', '.join(looked_for)})")


def _unreadable(file: Path, err: BaseException, error: type[Exception]) -> Exception:
    first = (str(err).strip().splitlines() or [""])[0]
    what = f"{type(err).__name__}: {first}" if first else type(err).__name__
    why = (
        "it is truncated or corrupt (an interrupted copy or download?)"
        if file.suffix == ".safetensors"
        else "it is truncated or corrupt, or not a state dict saved with torch.save"
    )
    return error(f"{file}: cannot read this weights file ({what}); {why}")


def _torch_state(file: Path, error: type[Exception]) -> dict[Any, Any]:
    try:
        # Memory-mapped: tensors that are never touched cost no memory and no reading.
        state = torch.load(file, map_location="cpu", mmap=True, weights_only=True)
    except Exception as err:  # RuntimeError, UnpicklingError, EOFError... all mean a broken file
        raise _unreadable(file, err, error) from err
    if not isinstance(state, dict):
        raise error(f"{file}: holds a {type(state).__name__}, not a state dict of named tensors")
    return state


def _check_exists(file: Path) -> None:
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such weights file")


def read_weight_keys(file: str | os.PathLike, *, error: type[Exception] = WeightFileError) -> list[str]:
    """The tensor names of one ``.safetensors`` (header only) or PyTorch file (memory-mapped, no tensor read)."""
    file = Path(file)
    _check_exists(file)
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            with safe_open(str(file), framework="pt", device="cpu") as f:
                return list(f.keys())
        except Exception as err:  # SafetensorError, OSError...
            raise _unreadable(file, err, error) from err
    return [str(k) for k in _torch_state(file, error)]


def read_weight_file(
    file: str | os.PathLike,
    select: Callable[[str], bool] | None = None,
    *,
    error: type[Exception] = WeightFileError,
) -> dict[str, torch.Tensor]:
    """The tensors of one ``.safetensors`` or PyTorch (``.bin``, any other suffix) file whose name ``select`` accepts.

    Only the selected tensors are read from a safetensors file; a PyTorch file is memory-mapped, so unselected
    tensors cost nothing and selected ones are paged in on first use. Errors (``error``, or FileNotFoundError)
    name the file: unreadable (truncated, corrupt, not a state dict) or a selected entry that is not a tensor.
    """
    file = Path(file)
    _check_exists(file)
    if file.suffix == ".safetensors":
        from safetensors import safe_open

        try:
            handle = safe_open(str(file), framework="pt", device="cpu")
            names = list(handle.keys())
        except Exception as err:  # SafetensorError, OSError...
            raise _unreadable(file, err, error) from err
        wanted = [k for k in names if select is None or select(k)]  # an error in select is not the file's
        try:
            return {k: handle.get_tensor(k) for k in wanted}
        except Exception as err:
            raise _unreadable(file, err, error) from err
    state = {str(k): v for k, v in _torch_state(file, error).items() if select is None or select(str(k))}
    for name, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise error(f"{file}: {name!r} is a {type(value).__name__}, not a tensor")
    return state
