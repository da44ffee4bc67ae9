"""The files that carry prefixes from the project's environment into vLLM's: one manifest and one table each.

The manifest (``manifest.json``) names the backbone, the placeholder token and every prefix; a prefix's table
(``<name>.safetensors``) holds ``keys`` and ``values`` of shape ``(num_layers, num_kv_heads, P, head_dim)``,
exactly what vLLM's cache must hold for the P placeholder positions (keys already rotated where the prefix's
position convention needs it). Written by ``export``; read by ``connector`` and ``routing`` inside vLLM, so this
module imports only torch and safetensors.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

MANIFEST = "manifest.json"
FORMAT = "ptuning_v2-vllm-prefixes"
VERSION = 1
# The environment variable through which vLLM's processes find the manifest.
MANIFEST_ENV = "PTUNING_V2_VLLM_MANIFEST"
# Read by the chat template written beside the manifest: how many placeholders start the prompt.
PREFIX_LENGTH_KWARG = "ptuning_v2_prefix_length"
# The key of a request's kv_transfer_params that names its prefix (set by ``routing``, read by ``connector``).
PREFIX_PARAM = "ptuning_v2_prefix"


@dataclass
class PrefixEntry:
    name: str
    file: str  # the table, relative to the manifest's folder
    length: int  # P: placeholder tokens a request for this prefix starts with
    position_convention: str  # as trained: "chatglm" (keys stored rotated by P) or "peft"
    source: str  # the checkpoint's format
    checkpoint: str  # where it was read from, for messages
    cache_salt: str  # enters vLLM's prefix-cache hashes: blocks of different prefixes are never shared


@dataclass
class Manifest:
    model: str  # the backbone, as vLLM loads it
    model_name: str  # the name that means "no prefix" in a request's model field
    placeholder_id: int
    placeholder_text: str  # tokenizes to exactly one placeholder_id per repeat
    num_layers: int
    num_kv_heads: int
    head_dim: int
    chat_template: str | None  # file beside the manifest: the backbone's template, placeholders first
    prefixes: list[PrefixEntry] = field(default_factory=list)

    def prefix(self, name: str) -> PrefixEntry | None:
        return next((entry for entry in self.prefixes if entry.name == name), None)


def table_salt(name: str, keys: torch.Tensor, values: torch.Tensor) -> str:
    """A salt that changes with the table's content, so a retrained prefix under the same name is not mixed up."""
    digest = hashlib.sha256()
    for tensor in (keys, values):
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return f"ptuning_v2:{name}:{digest.hexdigest()[:16]}"


def write_table(folder: Path, name: str, keys: torch.Tensor, values: torch.Tensor) -> str:
    """Write one prefix's table into ``folder`` (export's staging directory); returns its file name."""
    file = f"{name}.safetensors"
    save_file({"keys": keys.contiguous(), "values": values.contiguous()}, str(folder / file))
    return file


def write_manifest(folder: Path, manifest: Manifest) -> Path:
    path = folder / MANIFEST
    path.write_text(json.dumps({"format": FORMAT, "version": VERSION, **asdict(manifest)}, indent=2) + "\n")
    return path


def read_manifest(path: str | Path) -> Manifest:
    """The manifest at ``path`` (a file or its folder); ValueError naming the file and the field at fault."""
    path = Path(path)
    if path.is_dir():
        path = path / MANIFEST
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable prefix manifest ({err})") from err
    if raw.get("format") != FORMAT or raw.get("version") != VERSION:
        raise ValueError(
            f"{path}: format {raw.get('format')!r} version {raw.get('version')!r}, expected {FORMAT!r} {VERSION}; "
            "write it again with python -m ptuning_v2.vllm_serving.export"
        )
    try:
        entries = [PrefixEntry(**entry) for entry in raw.pop("prefixes")]
        raw.pop("format"), raw.pop("version")
        return Manifest(**raw, prefixes=entries)
    except (KeyError, TypeError) as err:
        raise ValueError(f"{path}: {err}") from err


def read_table(folder: Path, manifest: Manifest, entry: PrefixEntry) -> tuple[torch.Tensor, torch.Tensor]:
    """One prefix's keys and values, checked against the manifest; ValueError naming the table and checkpoint."""
    path = folder / entry.file
    expected = (manifest.num_layers, manifest.num_kv_heads, entry.length, manifest.head_dim)
    try:
        tensors = load_file(str(path))
        keys, values = tensors["keys"], tensors["values"]
    except (OSError, KeyError, RuntimeError) as err:
        raise ValueError(
            f"prefix {entry.name!r} ({entry.checkpoint}): table {path} unreadable: {err}"
        ) from err
    for label, tensor in (("keys", keys), ("values", values)):
        if tuple(tensor.shape) != expected:
            raise ValueError(
                f"prefix {entry.name!r} ({entry.checkpoint}): {path} holds {label} of shape {tuple(tensor.shape)}, "
                f"the backbone needs {expected} (layers, kv heads, P, head dim)"
            )
        if not torch.isfinite(tensor).all():
            raise ValueError(f"prefix {entry.name!r} ({entry.checkpoint}): {path} holds non-finite {label}")
    if table_salt(entry.name, keys, values) != entry.cache_salt:
        raise ValueError(
            f"prefix {entry.name!r}: {path} does not hold the table the manifest was written for; export again"
        )
    return keys, values
