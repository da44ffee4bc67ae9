"""A tiny backbone and three prefix checkpoints on disk, shared by the engine and API tests.

- ``long``: ours, 6 tokens, Prefix-Tuning (projection MLP), ChatGLM positions;
- ``short``: THUDM's official ptuning format (``pytorch_model.bin`` + ``config.json``), 3 tokens, P-Tuning v2;
- ``peft``: a PEFT adapter, 4 tokens, PEFT positions (real tokens start at 4).
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import torch
import uvicorn
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


class ServerThread:
    """uvicorn serving ``app`` in a thread of this process, on a free loopback port."""

    def __init__(self, app) -> None:
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "server did not start"
            time.sleep(0.05)
        self.port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
