"""The OpenAI-compatible server, driven by the official ``openai`` client on a loopback port: non-streaming,
streaming, mixed-prefix batches equal to single runs, every bad input, API keys, disconnects, and a load test."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest
from serving_fixtures import TEXTS, ServerThread, build_serving_fixture, user

from ptuning_v2.serving import Engine, SamplingParams
from ptuning_v2.serving.api import create_app

ROOT = Path(__file__).resolve().parents[1]
MODELS = ("glm-tiny", "long", "short", "peft")


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return build_serving_fixture(tmp_path_factory.mktemp("api"))


@pytest.fixture(scope="module")
def engine(paths):
    engine = Engine.load(
        str(paths["model"]),
        {name: str(paths[name]) for name in MODELS[1:]},
        max_batch_size=32,
        batch_wait_ms=200,
    )
    yield engine
    engine.close()


def ask(client, text: str, model: str, stream: bool = False, **kwargs) -> tuple[str, str | None]:
    """(answer, finish_reason) through the client, streamed or not."""
    messages = user(text)
    if not stream:
        reply = client.chat.completions.create(model=model, messages=messages, **kwargs)
        return reply.choices[0].message.content, reply.choices[0].finish_reason
    chunks = list(client.chat.completions.create(model=model, messages=messages, stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    finish = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    return text, finish[-1] if finish else None


@pytest.fixture(scope="module")
def singles(client):
    """Each prompt with each prefix and the bare backbone, asked one at a time."""
    return {(t, m): ask(client, t, m, max_tokens=12) for t in TEXTS[:4] for m in MODELS}


def test_models_lists_the_backbone_and_every_prefix(client):
    assert [m.id for m in client.models.list()] == list(MODELS)
    assert client.models.retrieve("short").id == "short"


def test_non_streaming_reply_and_usage(client, engine):
    reply = client.chat.completions.create(model="long", messages=user(TEXTS[0]), max_tokens=12)
    expected = engine.complete(user(TEXTS[0]), "long", SamplingParams(max_new_tokens=12))
    assert reply.object == "chat.completion" and reply.model == "long"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.completion_tokens == expected.completion_tokens
    assert reply.usage.total_tokens == expected.prompt_tokens + expected.completion_tokens


def test_streaming_chunks_add_up_to_the_reply(client, singles):
    stream = client.chat.completions.create(
        model="short",
        messages=user(TEXTS[1]),
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) > 1 and "".join(content) == singles[TEXTS[1], "short"][0]
    assert chunks[-2].choices[0].finish_reason == singles[TEXTS[1], "short"][1]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def test_sse_stream_ends_with_done(server):
    body = {"model": "glm-tiny", "messages": user("好"), "max_tokens": 3, "stream": True}
    request = urllib.request.Request(f"{server.url}/chat/completions", json.dumps(body).encode())
    with urllib.request.urlopen(request, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.read().decode().split("\n\n") if line]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-1])


def test_two_prefixes_and_the_backbone_in_one_batch_equal_single_runs(client, engine, singles):
    before = dict(engine.stats)
    keys = list(singles)
    with ThreadPoolExecutor(len(keys)) as pool:
        # half of them streamed: the batch does not care how the answer travels
        answers = list(
            pool.map(lambda ik: ask(client, *ik[1], stream=ik[0] % 2 == 1, max_tokens=12), enumerate(keys))
        )
    assert dict(zip(keys, answers)) == singles
    assert engine.stats["max_rows"] > 1 and engine.stats["prefills"] - before["prefills"] < len(keys)
    assert len({answer for answer, _ in singles.values()}) > len(TEXTS[:4]) * 2  # the prefixes change answers


def test_sampling_settings(client, singles):
    kwargs = {"max_tokens": 12, "temperature": 1.0, "top_p": 0.9, "seed": 11}
    first = ask(client, TEXTS[0], "long", **kwargs)
    assert ask(client, TEXTS[0], "long", stream=True, **kwargs) == first
    assert ask(client, TEXTS[0], "long", temperature=0, max_tokens=12) == singles[TEXTS[0], "long"]
    full, _ = singles[TEXTS[2], "peft"]
    stop = full[3:5]
    cut = ask(client, TEXTS[2], "peft", max_tokens=12, stop=stop)
    assert cut == (full[: full.find(stop)].rstrip(), "stop")
    short = client.chat.completions.create(model="glm-tiny", messages=user(TEXTS[0]), max_tokens=2)
    assert short.usage.completion_tokens <= 2


def _raw_post(url: str, data: bytes, headers: dict[str, str] | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        url, data, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read())


def _assert_openai_error(body: dict, param: str | None = None) -> None:
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param


def test_every_bad_request_gets_a_4xx_in_openai_shape_and_the_server_goes_on(client, server):
    def create(**kwargs):
        return client.chat.completions.create(**{"model": "long", "messages": user("好"), **kwargs})

    cases = [
        (
            openai.BadRequestError,
            "messages",
            lambda: client.post("/chat/completions", body={"model": "long"}, cast_to=object),
        ),
        (openai.BadRequestError, "messages", lambda: create(messages=[{"role": "wizard", "content": "hi"}])),
        (openai.BadRequestError, "messages", lambda: create(messages=[])),
        (openai.NotFoundError, "model", lambda: create(model="no-such-prefix")),
        (openai.BadRequestError, "max_tokens", lambda: create(max_tokens=0)),
        (openai.BadRequestError, "max_tokens", lambda: create(max_tokens=-3)),
        (openai.BadRequestError, "max_tokens", lambda: create(max_tokens=10_000)),
        (openai.BadRequestError, "messages", lambda: create(messages=user("北京" * 200))),
        (openai.BadRequestError, "temperature", lambda: create(temperature=5)),
        (openai.BadRequestError, "top_p", lambda: create(top_p=0)),
        (openai.BadRequestError, "stop", lambda: create(stop=["a", "b", "c", "d", "e"])),
        (openai.BadRequestError, "seed", lambda: create(seed="x")),
    ]
    for error, param, call in cases:
        with pytest.raises(error) as caught:
            call()
        assert caught.value.status_code in (400, 404)
        _assert_openai_error(
            caught.value.body if "error" in caught.value.body else {"error": caught.value.body}, param
        )
    with pytest.raises(openai.BadRequestError, match="context_length_exceeded|maximum context length"):
        create(max_tokens=10_000)
    # not JSON at all, and JSON that is not an object
    for data in (b"{not json", b"[1, 2]", b"\xff\xfe"):
        status, body = _raw_post(f"{server.url}/chat/completions", data)
        assert status == 400
        _assert_openai_error(body)
    status, body = _raw_post(f"{server.url}/no/such/route", b"{}")
    assert status == 404
    _assert_openai_error(body)
    assert ask(client, "好", "long", max_tokens=2)[1] in ("stop", "length")


def test_api_key_is_required_when_set(engine):
    server = ServerThread(create_app(engine, api_key="s3cret"))
    try:
        bad = openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0)
        with pytest.raises(openai.AuthenticationError) as caught:
            bad.chat.completions.create(model="long", messages=user("好"), max_tokens=2)
        _assert_openai_error({"error": caught.value.body})
        with pytest.raises(openai.AuthenticationError):
            bad.models.list()
        # no Authorization header at all (the client always sends one)
        data = json.dumps({"model": "long", "messages": user("好")}).encode()
        status, body = _raw_post(f"{server.url}/chat/completions", data)
        assert status == 401 and body["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=server.url, api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model="long", messages=user("好"), max_tokens=2).choices
        assert [m.id for m in good.models.list()] == list(MODELS)
    finally:
        server.stop()


def _wait_for(condition, what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def test_a_client_that_disconnects_mid_stream_frees_its_slot(server, engine, monkeypatch):
    # a request that would run its whole budget of 200 tokens (no stop token on the way)
    text, model = next(
        (t, m)
        for t in TEXTS
        for m in MODELS
        if engine.complete(
            user(t), None if m == "glm-tiny" else m, SamplingParams(max_new_tokens=200)
        ).finish_reason
        == "length"
    )
    # a tiny model decodes 200 tokens in a blink: slow each step down to a real model's pace, so the answer is
    # still running when the client leaves
    forward = engine._forward
    monkeypatch.setattr(engine, "_forward", lambda *args: (time.sleep(0.01), forward(*args))[1])
    body = {"model": model, "messages": user(text), "max_tokens": 200, "stream": True}
    cancelled = engine.stats["cancelled"]
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    response = connection.getresponse()
    assert response.status == 200
    while '"content": ""' in response.readline().decode() or engine.stats["running"] == 0:
        pass  # until text arrives: decoding has started
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    _wait_for(lambda: engine.stats["cancelled"] == cancelled + 1, f"not cancelled: {engine.stats}")
    _wait_for(lambda: engine.stats["running"] == 0, f"slot still busy: {engine.stats}")

    # and a client that gives up waiting for a non-streamed answer
    body["stream"] = False
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    _wait_for(lambda: engine.stats["running"] > 0, "never started")
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()
    _wait_for(lambda: engine.stats["cancelled"] == cancelled + 2, f"not cancelled: {engine.stats}")
    _wait_for(lambda: engine.stats["running"] == 0, f"slot still busy: {engine.stats}")


# ------------------------------------------------------------------------------- through scripts/api.sh


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def _api_sh(*settings: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(["bash", "scripts/api.sh", *settings], cwd=ROOT, env=env, text=True, **popen)


def test_a_checkpoint_that_does_not_fit_fails_at_start_up(paths, tmp_path):
    from tiny_models import save_tiny_backbone

    other = save_tiny_backbone(tmp_path / "deeper", TEXTS, num_hidden_layers=3)
    process = _api_sh(
        f"MODEL={other}",
        f"PREFIXES=short={paths['short']}",
        f"PORT={_free_port()}",
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = process.communicate(timeout=120)
    assert process.returncode == 1, out + err
    assert "error: prefix 'short'" in err and "does not fit this model" in err
    assert "Traceback" not in err
    for settings in (
        ["PORT=http"],
        ["MAX_BATCH_SIZE=0"],
        ["COLOUR=blue"],
        ["MAX_REQUEST_MESSAGES=0"],
        ["MAX_REQUEST_CHARS=x"],
        ["ENGINE=foo"],
        ["ENGINE=vllm", "QUANTIZATION_BIT=8"],  # vLLM quantizes in flight to 4 bits only
        ["ENGINE=vllm", "MAX_REQUEST_CHARS=100"],  # the native engine's bound
        ["ENGINE=vllm", "TENSOR_PARALLEL_SIZE=0"],
        ["ENGINE=vllm", "GPU_MEMORY_UTILIZATION=1.5"],
    ):
        process = _api_sh(*settings, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        _, err = process.communicate(timeout=120)
        assert process.returncode == 2 and "error:" in err and "Traceback" not in err, (settings, err)
        assert settings[-1].split("=")[0] in err, (settings, err)  # the message names the setting


def test_32_concurrent_clients_mixed_prefixes_streaming_and_not(paths, tmp_path):
    port = _free_port()
    prefixes = ",".join(f"{name}={paths[name]}" for name in MODELS[1:])
    log = (tmp_path / "server.log").open("w")
    process = _api_sh(
        f"MODEL={paths['model']}",
        f"PREFIXES={prefixes}",
        f"PORT={port}",
        "API_KEY=k",
        "MAX_BATCH_SIZE=16",
        "MAX_REQUEST_MESSAGES=50",
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        client = openai.OpenAI(
            base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=120
        )
        deadline = time.monotonic() + 120
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                assert process.poll() is None and time.monotonic() < deadline, (
                    tmp_path / "server.log"
                ).read_text()
                time.sleep(0.2)
        started = (tmp_path / "server.log").read_text()
        assert f"http://127.0.0.1:{port}/v1" in started  # loopback by default
        assert "at most 50 messages and 3840 characters per request" in started  # 256 tokens x 15 characters
        jobs = [
            (TEXTS[(c + r) % len(TEXTS)], MODELS[(c + 2 * r) % len(MODELS)])
            for c in range(32)
            for r in range(3)
        ]
        expected = {key: ask(client, *key, max_tokens=8) for key in set(jobs)}  # one at a time; warms up too
        time.sleep(1)
        idle = _rss_mb(process.pid)

        def run_client(c: int) -> list[bool]:
            own = openai.OpenAI(
                base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=120
            )
            return [
                ask(own, *jobs[3 * c + r], stream=(c + r) % 2 == 0, max_tokens=8) == expected[jobs[3 * c + r]]
                for r in range(3)
            ]

        with ThreadPoolExecutor(32) as pool:
            results = [ok for oks in pool.map(run_client, range(32)) for ok in oks]
        assert len(results) == 96 and all(results)
        health = json.loads(
            urllib.request.urlopen(
                urllib.request.Request(
                    f"http://127.0.0.1:{port}/health", headers={"Authorization": "Bearer k"}
                )
            ).read()
        )
        assert health["max_rows"] > 8 and health["running"] == 0
        time.sleep(1)
        after = _rss_mb(process.pid)
        print(f"server RSS: idle {idle:.0f} MB, after 96 requests from 32 clients {after:.0f} MB")
        assert after < idle * 1.10 + 20, f"RSS idle {idle:.0f} MB, after the load {after:.0f} MB"
    finally:
        process.terminate()
        process.wait(timeout=60)
        log.close()
