"""Convert original THUDM ChatGLM2/3 checkpoints into what this project loads.

    python -m ptuning_v2.convert SRC DST [--dtype bf16|fp16|fp32] [--max-shard-size 2GB] [--overwrite]

Two kinds of SRC, told apart by their weights:

* a full ChatGLM2/3 model (``model_type: "chatglm"``): DST becomes a native ``GlmForCausalLM`` checkpoint
  (sharded safetensors, config.json, generation_config.json, plus a tokenizer when SRC has a SentencePiece
  ``tokenizer.model``) that plain ``AutoModelForCausalLM.from_pretrained(DST)`` loads. Prefix-encoder
  tensors found next to the backbone go to ``DST/ptuning_prefix`` in our prefix format;
* an official ``ptuning/`` output directory (only ``transformer.prefix_encoder.*`` tensors; its config.json
  gives the model geometry): DST becomes a prefix checkpoint in our format.

DST is built in a temporary directory beside it and renamed into place at the end, so an interrupted run
never leaves a half-written DST.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from .chatglm import (
    PREFIX_ENCODER_KEY,
    ChatGLMConversionError,
    chatglm_to_glm_config,
    chatglm_weight_files,
    read_chatglm_config,
    read_json,
    write_glm_checkpoint,
)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PREFIX_SUBDIR = "ptuning_prefix"
_BACKBONE_PROBE = "transformer.embedding.word_embeddings.weight"


def _weight_keys(src: Path) -> set[str]:
    """Tensor names of a checkpoint without reading tensor data (index, safetensors header or mmap)."""
    for index in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if (src / index).is_file():
            return set(read_json(src / index).get("weight_map", {}))
    keys: set[str] = set()
    for file in chatglm_weight_files(src):
        if file.suffix == ".safetensors":
            from safetensors import safe_open

            with safe_open(str(file), framework="pt") as f:
                keys.update(f.keys())
        else:
            keys.update(torch.load(file, map_location="cpu", mmap=True, weights_only=True))
    return keys


def _write_prefix(src: Path, out: Path, chatglm_config: dict) -> str:
    """Official prefix tensors of ``src`` -> our prefix format in ``out``; returns a one-line description."""
    from .checkpoint import load_prefix_checkpoint, write_prefix_checkpoint
    from .prefix_encoder import kv_shape_from_config

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
    if dst_path.exists() and not overwrite:
        raise FileExistsError(f"{dst_path} already exists (pass --overwrite to replace it)")
    read_chatglm_config(src_path)  # fail early, before creating anything
    keys = _weight_keys(src_path)
    torch_dtype = DTYPES[dtype] if dtype else None

    dst_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst_path.name}.tmp-", dir=dst_path.parent))
    try:
        if _BACKBONE_PROBE in keys:
            notes = convert_model(src_path, tmp, torch_dtype, max_shard_size)
        elif any(k.startswith(PREFIX_ENCODER_KEY) for k in keys):
            notes = convert_prefix(src_path, tmp)
        else:
            raise ChatGLMConversionError(
                f"{src_path}: neither a ChatGLM model ({_BACKBONE_PROBE} missing) nor an official prefix "
                f"checkpoint ({PREFIX_ENCODER_KEY}* missing)"
            )
        _replace_dir(tmp, dst_path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return notes


def _replace_dir(new: Path, dst: Path) -> None:
    if dst.exists():
        # Move the old tree aside first so dst is always either the old or the new complete tree.
        old = Path(tempfile.mkdtemp(prefix=f".{dst.name}.old-", dir=dst.parent))
        os.replace(dst, old / "tree")
        os.replace(new, dst)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, dst)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ptuning_v2.convert",
        description="Convert an original ChatGLM2/3 checkpoint (or an official ptuning prefix checkpoint) "
        "into a transformers-native GLM checkpoint (or our prefix format).",
    )
    parser.add_argument("src", help="original checkpoint directory (config.json with model_type 'chatglm')")
    parser.add_argument("dst", help="output directory (must not exist unless --overwrite)")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), default=None, help="default: keep the stored dtype"
    )
    parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors shard, e.g. 2GB, 500MB")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing DST")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        notes = convert(args.src, args.dst, args.dtype, args.max_shard_size, args.overwrite)
    except (ChatGLMConversionError, FileExistsError, FileNotFoundError, ValueError) as err:
        sys.exit(f"error: {err}")
    for note in notes:
        print(note)
    print(f"wrote {args.dst}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
