"""Convert original THUDM ChatGLM2/3 checkpoints into what this project loads.

    python -m ptuning_v2.convert SRC DST [--dtype bf16|fp16|fp32] [--max-shard-size 2GB] [--overwrite]

Two kinds of SRC, told apart by their weights:

* a full ChatGLM2/3 model (``model_type: "chatglm"``): DST becomes a native ``GlmForCausalLM`` checkpoint
  (sharded safetensors, config.json, generation_config.json, plus a tokenizer when SRC has a SentencePiece
  ``tokenizer.model``) that plain ``AutoModelForCausalLM.from_pretrained(DST)`` loads. Prefix-encoder
  tensors found next to the backbone go to ``DST/ptuning_prefix`` in our prefix format;
* an official ``ptuning/`` output directory (only ``transformer.prefix_encoder.*`` tensors; its config.json
  gives the model geometry): DST becomes a prefix checkpoint in our format.

DST must not exist or be an empty directory (``--overwrite`` replaces a non-empty one). It is built in a
temporary directory beside it and renamed into place at the end, so a failed or interrupted run never leaves
a half-written DST (nor the parent directories it had to create).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from .chatglm import (
    PREFIX_ENCODER_KEY,
    ChatGLMConversionError,
    chatglm_to_glm_config,
    parse_size,
    read_chatglm_config,
    write_glm_checkpoint,
)
from .files import atomic_directory
from .weights import find_weight_files, read_weight_keys

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PREFIX_SUBDIR = "ptuning_prefix"
_BACKBONE_PROBE = "transformer.embedding.word_embeddings.weight"


def _weight_keys(src: Path) -> set[str]:
    """Tensor names of a checkpoint without reading tensor data; every weight file's header is opened, so a
    truncated shard is found before anything is written (the error names it)."""
    keys: set[str] = set()
    for file in find_weight_files(src, error=ChatGLMConversionError):
        keys.update(read_weight_keys(file, error=ChatGLMConversionError))
    return keys


_REQUIRED_INTS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads", "padded_vocab_size")


def _read_source_config(src: Path) -> dict:
    """SRC's config.json, checked enough that the conversion cannot fail on it halfway."""
    if not src.exists():
        raise FileNotFoundError(f"{src}: no such directory")
    if src.is_file():
        raise ChatGLMConversionError(
            f"{src} is a file; SRC is the checkpoint directory holding config.json and the weights "
            f"(perhaps {src.parent})"
        )
    config_file = src / "config.json"
    config = read_chatglm_config(src)  # names the file on bad JSON
    if "position_encoding_2d" not in config and "num_layers" in config:
        required = list(_REQUIRED_INTS)
        if config.get("multi_query_attention"):
            required.append("multi_query_group_num")
        for field in required:
            value = config.get(field)
            if field not in config:
                raise ChatGLMConversionError(f"{config_file}: missing field {field!r} (a positive integer)")
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ChatGLMConversionError(
                    f"{config_file}: field {field!r} must be a positive integer, got {json.dumps(value)}"
                )
    try:
        chatglm_to_glm_config(config)  # unsupported variants fail here, before anything is written
    except ChatGLMConversionError as err:
        raise ChatGLMConversionError(f"{config_file}: {err}") from err
    except (KeyError, TypeError, ValueError) as err:
        raise ChatGLMConversionError(
            f"{config_file}: cannot map this config onto GlmConfig ({err!r})"
        ) from err
    return config


def _check_destination(src: Path, dst: Path, overwrite: bool) -> None:
    """DST may be new or an empty directory; a non-empty one needs --overwrite; it may never hold SRC."""
    resolved_src, resolved_dst = src.resolve(), dst.resolve()
    if resolved_dst == resolved_src or resolved_dst in resolved_src.parents:
        raise ChatGLMConversionError(
            f"{dst} is SRC or holds it; converting into it would destroy the source: pick another DST"
        )
    if not dst.exists() and not dst.is_symlink():
        return
    if not dst.is_dir():
        raise FileExistsError(f"{dst} exists and is not a directory; DST must be a new or empty directory")
    entries = sorted(os.listdir(dst))
    if entries and not overwrite:
        shown = ", ".join(entries[:5]) + (f" and {len(entries) - 5} more" if len(entries) > 5 else "")
        raise FileExistsError(
            f"{dst} already exists and is not empty (it holds {shown}); pass --overwrite to "
            "replace it, or pick a new or empty directory"
        )


def _write_prefix(src: Path, out: Path, chatglm_config: dict) -> str:
    """Official prefix tensors of ``src`` -> our prefix format in ``out``; returns a one-line description."""
    from .methods.prefix import kv_shape_from_config, load_prefix_checkpoint, write_prefix_checkpoint

    checkpoint = load_prefix_checkpoint(src)
    kv_shape = kv_shape_from_config(chatglm_to_glm_config(chatglm_config))
    if checkpoint.kv_size != kv_shape.kv_size:
        raise ChatGLMConversionError(
            f"{src}: the prefix has {checkpoint.describe()}, but config.json implies {kv_shape.describe()}"
        )
    extra = {
        "base_model": {"model_type": "glm", "name_or_path": None, "architecture": "GlmForCausalLM"},
        "converted_from": f"official ChatGLM ptuning checkpoint {src.resolve()}",
    }
    write_prefix_checkpoint(out, checkpoint.config, kv_shape, checkpoint.state_dict, extra)
    return checkpoint.describe()


def _write_tokenizer(src: Path, out: Path, vocab_size: int) -> bool:
    sp_model = src / "tokenizer.model"
    if not sp_model.is_file():
        return False
    from .tokenization import build_chatglm_tokenizer

    tokenizer = build_chatglm_tokenizer(sp_model)
    if len(tokenizer) > vocab_size:
        raise ChatGLMConversionError(
            f"{sp_model}: the tokenizer has {len(tokenizer)} tokens but the model's vocabulary only {vocab_size}"
        )
    tokenizer.save_pretrained(out)
    return True


def convert_model(src: Path, out: Path, dtype: torch.dtype | None, max_shard_size: str) -> list[str]:
    """Full ChatGLM2/3 checkpoint -> native GLM checkpoint in ``out``; returns notes for the user."""
    config = read_chatglm_config(src)
    prefix = write_glm_checkpoint(src, out, dtype=dtype, max_shard_size=max_shard_size)
    notes = [f"model: {config['num_layers']} layers, hidden {config['hidden_size']} -> GlmForCausalLM"]
    if _write_tokenizer(src, out, int(config["padded_vocab_size"])):
        notes.append("tokenizer: built from tokenizer.model")
    if prefix:
        description = _write_prefix(src, out / PREFIX_SUBDIR, config)
        notes.append(f"prefix found beside the backbone -> {PREFIX_SUBDIR}/ ({description})")
    return notes


def convert_prefix(src: Path, out: Path) -> list[str]:
    """Official ptuning output directory -> our prefix checkpoint format in ``out``."""
    if not (src / "config.json").is_file():
        raise ChatGLMConversionError(
            f"{src}: an official prefix checkpoint needs its config.json (model geometry)"
        )
    config = read_chatglm_config(src)
    return [f"prefix: {_write_prefix(src, out, config)}"]


def convert(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    dtype: str | None = None,
    max_shard_size: str = "2GB",
    overwrite: bool = False,
) -> list[str]:
    """Convert ``src`` (full model or official prefix checkpoint) into ``dst`` atomically; returns notes."""
    src_path, dst_path = Path(src), Path(dst)
    # Everything that can be checked is checked before anything is created.
    _read_source_config(src_path)
    _check_destination(src_path, dst_path, overwrite)
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    try:
        parse_size(max_shard_size)
    except (TypeError, ValueError) as err:
        raise ValueError(
            f"max_shard_size {max_shard_size!r} is not a size such as 2GB or 500MB ({err})"
        ) from err
    keys = _weight_keys(src_path)
    torch_dtype = DTYPES[dtype] if dtype else None

    # Built in a temporary sibling and swapped in whole; on failure that and any parents it made are removed.
    with atomic_directory(dst_path, replace=True) as tmp:
        if _BACKBONE_PROBE in keys:
            notes = convert_model(src_path, tmp, torch_dtype, max_shard_size)
        elif any(k.startswith(PREFIX_ENCODER_KEY) for k in keys):
            notes = convert_prefix(src_path, tmp)
        else:
            raise ChatGLMConversionError(
                f"{src_path}: neither a ChatGLM model ({_BACKBONE_PROBE} missing) nor an official prefix "
                f"checkpoint ({PREFIX_ENCODER_KEY}* missing)"
            )
    return notes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ptuning_v2.convert",
        description="Convert an original ChatGLM2/3 checkpoint (or an official ptuning prefix checkpoint) "
        "into a transformers-native GLM checkpoint (or our prefix format).",
    )
    parser.add_argument("src", help="original checkpoint directory (config.json with model_type 'chatglm')")
    parser.add_argument("dst", help="output directory: new or empty (a non-empty one needs --overwrite)")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: keep the stored dtype"
    )
    parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard, e.g. 2GB, 500MB")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing non-empty DST")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        notes = convert(args.src, args.dst, args.dtype, args.max_shard_size, args.overwrite)
    except (ChatGLMConversionError, OSError, ValueError) as err:
        sys.exit(f"error: {err}")
    for note in notes:
        print(note)
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
