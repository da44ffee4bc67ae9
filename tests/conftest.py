import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


import openai  # noqa: E402
import pytest  # noqa: E402
from serving_fixtures import ServerThread  # noqa: E402

import ptuning_v2.train as train_module  # noqa: E402
from ptuning_v2.serving.api import create_app  # noqa: E402


@pytest.fixture(scope="module")
def server(engine):
    """The API over the requesting module's own ``engine`` fixture, on a free loopback port."""
    server = ServerThread(create_app(engine))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    """The official openai client of that server."""
    return openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0, timeout=60)


@pytest.fixture
def no_loading(monkeypatch):
    """Settings errors must come before the tokenizer or the model is loaded."""

    def refuse(*args, **kwargs):
        raise AssertionError("loaded the model before the settings were checked")

    monkeypatch.setattr(train_module, "load_tokenizer", refuse)
    monkeypatch.setattr(train_module, "load_model", refuse)
