"""Prefix checkpoints -> the tables vLLM's cache must hold, written as files for vLLM's environment (``tables``).

    python -m ptuning_v2.vllm_serving.export --model models/glm-zh-tiny --prefixes ner=output/ner --out RUN_DIR

Every checkpoint is read by the native engine's loader (any method that acts as a prefix, any format
``load_model`` reads), so a checkpoint that does not fit fails here, naming it, before vLLM starts.

Positions: vLLM gives the P placeholder tokens positions 0..P-1, so the real tokens start at P. That is PEFT's
convention as it is. ChatGLM's puts the real tokens at 0.. and never rotates the prefix keys; since rotary
attention scores depend only on the distance between positions, a query at P+i meeting a key rotated by P scores
what a query at i meets an unrotated key. So ChatGLM-convention keys are stored rotated by P, with the backbone's
own rotary embedding (partial and interleaved rotary included, as the model defines them).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from ..files import atomic_directory
from ..methods.prefix import kv_shape_from_config
from ..serving.engine import Engine, PrefixTable
from ..serving.settings import DEFAULT_MODEL, served_prefixes
from .tables import (
    MANIFEST,
    PREFIX_LENGTH_KWARG,
    Manifest,
    PrefixEntry,
    table_salt,
    write_manifest,
    write_table,
)


def rotate_keys(backbone: nn.Module, keys: torch.Tensor, offset: int) -> torch.Tensor:
    """``keys`` ``(layers, kv_heads, P, head_dim)`` rotated by position ``offset`` with the backbone's rotary."""
    decoder = backbone.get_decoder()
    rotary = getattr(decoder, "rotary_emb", None)
    # apply_rotary_pos_emb is the public function of each transformers model module; it is how the model itself
    # rotates (which dims, interleaved or halves), so using it is what makes the scores equal.
    apply = getattr(sys.modules[type(decoder).__module__], "apply_rotary_pos_emb", None)
    if rotary is None or apply is None:
        raise ValueError(
            f"{type(backbone).__name__} has no rotary embedding this export knows (decoder.rotary_emb and its "
            "module's apply_rotary_pos_emb); a ChatGLM-convention prefix cannot be placed on vLLM for it"
        )
    layers, heads, length, head_dim = keys.shape
    rotary_device = next(iter(rotary.buffers()), keys).device
    flat = keys.reshape(1, layers * heads, length, head_dim).to(rotary_device, torch.float32)
    positions = torch.full((1, length), offset, dtype=torch.long, device=rotary_device)
    with torch.no_grad():
        cos, sin = rotary(flat, positions)
        _, rotated = apply(flat, flat, cos.float(), sin.float())
    return rotated.reshape(layers, heads, length, head_dim).cpu()


def placeholder_token(tokenizer) -> tuple[int, str]:
    """A special token that tokenizes to itself alone, repeated or not: what a prefixed prompt starts with."""
    for text in (tokenizer.pad_token, tokenizer.unk_token, tokenizer.eos_token):
        if not text:
            continue
        ids = tokenizer(text * 3, add_special_tokens=False)["input_ids"]
        if len(ids) == 3 and len(set(ids)) == 1:
            return ids[0], text
    raise ValueError(
        "the tokenizer has no pad, unk or eos token that tokenizes to one token; cannot mark prefixes"
    )


def table_tensors(backbone: nn.Module, table: PrefixTable) -> tuple[torch.Tensor, torch.Tensor]:
    keys = torch.stack([k.float().cpu() for k in table.keys])
    values = torch.stack([v.float().cpu() for v in table.values])
    if table.position_convention == "chatglm":
        keys = rotate_keys(backbone, keys, table.length)
    return keys.contiguous(), values.contiguous()


def export(model: str, prefixes: dict[str, str], out: Path, quantization_bit: str | None = None) -> Path:
    """Write every prefix's table and the manifest into ``out``, replaced whole and only once all is written (a
    failure leaves ``out`` as it was); returns the manifest's path."""
    with (
        Engine.load(model, prefixes, quantization_bit, device="cpu") as engine,
        atomic_directory(out, replace=True) as staging,
    ):
        config = engine.model.config
        placeholder_id, placeholder_text = placeholder_token(engine.tokenizer)
        entries = []
        for name in engine.prefix_names:
            table = engine.prefixes[name]
            keys, values = table_tensors(engine.model, table)
            entries.append(
                PrefixEntry(
                    name=name,
                    file=write_table(staging, name, keys, values),
                    length=table.length,
                    position_convention=table.position_convention,
                    source=table.source,
                    checkpoint=table.path,
                    cache_salt=table_salt(name, keys, values),
                )
            )
        template = engine.tokenizer.chat_template
        template_file = None
        if isinstance(template, str):
            template_file = "chat_template.jinja"
            marks = f"{{% if {PREFIX_LENGTH_KWARG} is defined %}}{{{{ {placeholder_text!r} * {PREFIX_LENGTH_KWARG} }}}}{{% endif %}}"
            (staging / template_file).write_text(marks + template)
        shape = kv_shape_from_config(config)  # the geometry every table was built for
        manifest = Manifest(
            model=str(Path(model).resolve()) if Path(model).exists() else model,
            model_name=engine.model_name,
            placeholder_id=placeholder_id,
            placeholder_text=placeholder_text,
            num_layers=shape.num_layers,
            num_kv_heads=shape.num_kv_heads,
            head_dim=shape.head_dim,
            chat_template=template_file,
            prefixes=entries,
        )
        write_manifest(staging, manifest)
    return out / MANIFEST


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--prefixes", default=None, help="NAME=PATH[,...]; default: the main job's prefix")
    parser.add_argument(
        "--quantization_bit", default=None, help="4 or 8: load the backbone so to compute tables"
    )
    parser.add_argument("--out", required=True, help="folder to write (replaced whole)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    prefixes = served_prefixes(args.prefixes, args.model)
    path = export(args.model, prefixes, Path(args.out), args.quantization_bit)
    print(f"prefix tables for vLLM: {path} ({', '.join(prefixes) or 'no prefixes'})", flush=True)


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
