"""A tiny backbone and three prefix checkpoints on disk, shared by the engine and API tests.

- ``long``: ours, 6 tokens, Prefix-Tuning (projection MLP), ChatGLM positions;
- ``short``: THUDM's official ptuning format (``pytorch_model.bin`` + ``config.json``), 3 tokens, P-Tuning v2;
- ``peft``: a PEFT adapter, 4 tokens, PEFT positions (real tokens start at 4).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tiny_models import save_tiny_backbone

from ptuning_v2 import PrefixConfig, attach_prefix, export_peft_adapter, load_model

TEXTS = [
    "北京天气怎么样",
    "上海",
    "请把这句话分词：我爱北京天安门",
    "好",
    "人民日报记者报道",
    "今天是一个晴朗的好日子",
]


def _random_prefix(model_dir: Path, config: PrefixConfig, seed: int):
    model = load_model(str(model_dir))
    attach_prefix(model, config)
    torch.manual_seed(seed)
    for param in model.tuning.encoder.parameters():
        torch.nn.init.normal_(param, std=0.5)
    return model


def build_serving_fixture(root: Path) -> dict[str, Path]:
    """Write the backbone and prefixes under ``root``; returns their paths by name ("model" for the backbone)."""
    model_dir = root / "glm-tiny"
    save_tiny_backbone(model_dir, TEXTS + ["人名地名机构名无：；、"], initializer_range=0.3)
    paths = {"model": model_dir}

    long = _random_prefix(
        model_dir, PrefixConfig(pre_seq_len=6, prefix_projection=True, prefix_dropout=0.0), 3
    )
    paths["long"] = long.tuning.save(root / "long")

    short = _random_prefix(model_dir, PrefixConfig(pre_seq_len=3, prefix_dropout=0.0), 4)
    official = root / "short-official"
    official.mkdir()
    weight = short.tuning.encoder.embedding.weight.detach().clone()
    torch.save({"transformer.prefix_encoder.embedding.weight": weight}, official / "pytorch_model.bin")
    (official / "config.json").write_text(json.dumps({"pre_seq_len": 3, "prefix_projection": False}))
    paths["short"] = official

    peft = _random_prefix(
        model_dir, PrefixConfig(pre_seq_len=4, prefix_dropout=0.0, position_convention="peft"), 5
    )
    paths["peft"] = export_peft_adapter(peft, root / "peft")
    return paths


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]
