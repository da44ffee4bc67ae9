"""A tiny backbone whose replies never end on their own, and two prefixes, for the terminal and web chat tests.

Replies run to ``max_new_tokens`` (the rows of the stop tokens in the output layer are zero, so greedy decoding
never picks them over the best of ~130 random logits), and the context is long, so that a test can catch a
reply while it is still streaming and stop it.

- ``ours``: our format, 6 tokens, Prefix-Tuning (projection MLP);
- ``official``: THUDM's ptuning format (``pytorch_model.bin`` + ``config.json``), 3 tokens, P-Tuning v2.
"""

from __future__ import annotations

import json
import socket
from pathlib import Path

import torch
from tiny_models import save_tiny_backbone

from ptuning_v2 import PrefixConfig, attach_prefix, load_model, load_tokenizer
from ptuning_v2.generation import stop_token_ids

TEXTS = [
    "北京天气怎么样",
    "上海",
    "请把这句话分词：我爱北京天安门",
    "人民日报记者报道",
    "今天是一个晴朗的好日子",
]


def build_chat_fixture(root: Path) -> dict[str, Path]:
    """Write the backbone and the prefixes under ``root``; returns their paths by name ("model": the backbone)."""
    model_dir = save_tiny_backbone(
        root / "glm-chat",
        TEXTS,
        initializer_range=0.3,
        max_position_embeddings=16384,
        tie_word_embeddings=False,
    )
    model = load_model(str(model_dir))
    with torch.no_grad():
        for token in stop_token_ids(load_tokenizer(str(model_dir))):
            model.lm_head.weight[token] = 0.0
    model.save_pretrained(model_dir)

    paths = {"model": model_dir}
    ours = _random_prefix(
        model_dir, PrefixConfig(pre_seq_len=6, prefix_projection=True, prefix_dropout=0.0), 3
    )
    paths["ours"] = ours.tuning.save(root / "ours")

    official = _random_prefix(model_dir, PrefixConfig(pre_seq_len=3, prefix_dropout=0.0), 4)
    paths["official"] = root / "official"
    paths["official"].mkdir()
    weight = official.tuning.encoder.embedding.weight.detach().clone()
    torch.save(
        {"transformer.prefix_encoder.embedding.weight": weight}, paths["official"] / "pytorch_model.bin"
    )
    (paths["official"] / "config.json").write_text(json.dumps({"pre_seq_len": 3, "prefix_projection": False}))
    return paths


def _random_prefix(model_dir: Path, config: PrefixConfig, seed: int):
    model = load_model(str(model_dir))
    attach_prefix(model, config)
    torch.manual_seed(seed)
    for param in model.tuning.encoder.parameters():
        torch.nn.init.normal_(param, std=0.5)
    return model


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]
