"""Every OpenAI request field the server knows, through the official ``openai`` client: honoured ones have a
visible effect (log-probabilities equal the model's own, penalties and biases change the answer as their formula
says, n answers follow their seeds), refused ones get a 400 naming the field, ``/v1/completions`` answers as the
chat does, and requests too large are refused fast, before any rendering."""

from __future__ import annotations

import http.client
import json
import math
import re
import time
from pathlib import Path

import openai
import pytest
import torch
from serving_fixtures import TEXTS, ServerThread, build_serving_fixture, user
from test_api import _raw_post

from ptuning_v2 import load_model
from ptuning_v2.serving import Engine, SamplingParams
from ptuning_v2.serving.api import create_app
from ptuning_v2.serving.protocol import HONOURED, REFUSED, RequestLimits

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return build_serving_fixture(tmp_path_factory.mktemp("api-params"))


@pytest.fixture(scope="module")
def engine(paths):
    engine = Engine.load(str(paths["model"]), {n: str(paths[n]) for n in ("long", "peft")}, max_batch_size=8)
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def models(paths):
    """The reference: ``load_model`` with each checkpoint (None: the bare backbone)."""
    return {
        name: load_model(str(paths["model"]), None if name is None else str(paths[name])).eval()
        for name in (None, "long", "peft")
    }


def _log_likelihoods(model, ids: list[int], start: int) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= start, from one plain forward of ``model``."""
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0].float()
    logprobs = torch.log_softmax(logits, dim=-1)
    return [float(logprobs[i - 1, ids[i]]) for i in range(start, len(ids))]


def _greedy(engine, text: str, prefix: str | None, **params) -> list[int]:
    return engine.complete(user(text), prefix, SamplingParams(**{"max_new_tokens": 12, **params})).token_ids


# ------------------------------------------------------------------------------------------ the table


def test_the_readme_table_lists_exactly_what_the_server_does():
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("### Request parameters") :]
    section = section[: section.index("\n### ", 1)]
    rows = re.findall(r"^\| `([a-z_]+)` \| ([^|]+) \|", section, re.M)
    listed = {name: where.strip() for name, where in rows}
    for endpoint, fields in HONOURED.items():
        for name in fields:
            assert name in listed, f"{name} ({endpoint}) is missing from the README's parameter table"
    assert set(listed) == set(HONOURED["chat"]) | set(HONOURED["completions"]) | set(REFUSED)
    for name in REFUSED:
        assert listed[name].startswith("refused"), f"the README says {name} is {listed[name]!r}"


# ------------------------------------------------------------------------------------------ logprobs


def test_chat_logprobs_are_the_models_own(client, engine, models):
    reply = client.chat.completions.create(
        model="long", messages=user(TEXTS[2]), max_tokens=8, logprobs=True, top_logprobs=3
    )
    content = reply.choices[0].logprobs.content
    ids = _greedy(engine, TEXTS[2], "long", max_new_tokens=8)
    assert len(content) == len(ids) == reply.usage.completion_tokens
    prompt = engine.prompt_ids(user(TEXTS[2]))
    expected = _log_likelihoods(models["long"], prompt + ids, len(prompt))
    assert abs(sum(t.logprob for t in content) - sum(expected)) < 1e-4
    for token, logprob in zip(content, expected):
        assert abs(token.logprob - logprob) < 1e-4
        assert len(token.top_logprobs) == 3
        assert token.top_logprobs[0].token == token.token  # greedy: the chosen token is the likeliest
        assert token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob >= token.top_logprobs[2].logprob
        assert token.bytes == list(token.token.encode())
    assert "".join(t.token for t in content).strip() == reply.choices[0].message.content
    # streamed: the same entries, spread over the chunks that carry their text
    chunks = list(
        client.chat.completions.create(
            model="long", messages=user(TEXTS[2]), max_tokens=8, logprobs=True, top_logprobs=3, stream=True
        )
    )
    streamed = [
        t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content
    ]
    assert [(t.token, round(t.logprob, 5)) for t in streamed] == [
        (t.token, round(t.logprob, 5)) for t in content
    ]
    plain = client.chat.completions.create(model="long", messages=user(TEXTS[2]), max_tokens=8)
    assert plain.choices[0].logprobs is None


def test_completions_echo_logprobs_score_the_prompt(client, engine, models):
    """What lm-evaluation-harness's loglikelihood asks: echo, logprobs, and nothing (or one token) generated."""
    text = TEXTS[4]
    ids = engine.tokenizer(text)["input_ids"]
    for model in ("peft", "glm-tiny"):
        reference = models[None if model == "glm-tiny" else model]
        expected = _log_likelihoods(reference, ids, 1)
        for max_tokens in (0, 1):
            reply = client.completions.create(
                model=model, prompt=text, max_tokens=max_tokens, echo=True, logprobs=2
            )
            choice = reply.choices[0]
            assert choice.text.startswith(text)
            lp = choice.logprobs
            assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
            scored = lp.token_logprobs[1 : len(ids)]
            assert abs(sum(scored) - sum(expected)) < 1e-4, (model, max_tokens)
            assert len(lp.tokens) == len(ids) + max_tokens
            assert all(len(top) <= 2 for top in lp.top_logprobs[1:])
            assert lp.text_offset == sorted(lp.text_offset)
        assert reply.usage.prompt_tokens == len(ids)


def test_completions_answer_as_the_engine_does(client, engine):
    text = TEXTS[0]
    ids = engine.tokenizer(text)["input_ids"]
    for model, prefix in (("glm-tiny", None), ("long", "long"), ("peft", "peft")):
        expected = engine.submit(ids, prefix, SamplingParams(max_new_tokens=10))
        expected_text = "".join(expected)
        reply = client.completions.create(model=model, prompt=text, max_tokens=10)
        assert reply.object == "text_completion" and reply.model == model
        assert reply.choices[0].text == expected_text
        assert reply.choices[0].finish_reason == expected.finish_reason
        assert reply.usage.completion_tokens == expected.completion_tokens
        # the same prompt as token ids, and streamed
        assert (
            client.completions.create(model=model, prompt=ids, max_tokens=10).choices[0].text == expected_text
        )
        chunks = list(client.completions.create(model=model, prompt=text, max_tokens=10, stream=True))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected_text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == expected.finish_reason
    answers = {
        m: client.completions.create(model=m, prompt=text, max_tokens=10).choices[0].text
        for m in ("long", "peft", "glm-tiny")
    }
    assert len(set(answers.values())) > 1  # the model field picks the prefix
    # several prompts: one choice each, in order; echo puts each prompt first
    many = client.completions.create(model="long", prompt=[TEXTS[0], TEXTS[1]], max_tokens=10, echo=True)
    assert [c.index for c in many.choices] == [0, 1]
    assert many.choices[0].text == TEXTS[0] + answers["long"]
    assert many.choices[1].text.startswith(TEXTS[1])
    # the legacy default budget is 16 tokens, capped at the room a long prompt leaves (not refused)
    assert client.completions.create(model="long", prompt=text).usage.completion_tokens <= 16
    near_the_end = (ids * engine.context_length)[: engine.context_length - 3]
    capped = client.completions.create(model="long", prompt=near_the_end)
    assert capped.usage.completion_tokens <= 3
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.completions.create(model="long", prompt=near_the_end, max_tokens=4)
    whole = client.completions.create(model="long", prompt=text, max_tokens=4, echo=True, logprobs=1)
    streamed = list(
        client.completions.create(
            model="long",
            prompt=text,
            max_tokens=4,
            echo=True,
            logprobs=1,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in streamed if c.choices) == whole.choices[0].text
    blocks = [c.choices[0].logprobs for c in streamed if c.choices and c.choices[0].logprobs]
    assert [t for b in blocks for t in b.tokens] == whole.choices[0].logprobs.tokens
    assert [o for b in blocks for o in b.text_offset] == whole.choices[0].logprobs.text_offset
    assert len(whole.choices[0].logprobs.tokens) == len(ids) + streamed[-1].usage.completion_tokens


# ---------------------------------------------------------------------------------------- penalties


def _reference_greedy(model, prompt: list[int], steps: int, adjust) -> list[int]:
    """Greedy decoding by full forwards, each step's logits passed through ``adjust(logits, answer)`` first."""
    answer: list[int] = []
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + answer])).logits[0, -1].float()
        answer.append(int(adjust(logits, answer).argmax()))
    return answer


def _repetitive(engine) -> str:
    """A prompt whose greedy answer repeats a token, so that penalties have something to act on."""
    for text in TEXTS:
        ids = _greedy(engine, text, None, max_new_tokens=12)
        if len(set(ids)) < len(ids):
            return text
    pytest.skip("no prompt of the fixture repeats a token")


@pytest.mark.parametrize(
    "field, value",
    [
        ("frequency_penalty", 1.5),
        ("presence_penalty", 1.5),
        ("repetition_penalty", 1.8),
        ("frequency_penalty", -1.0),
    ],
)
def test_penalties_follow_their_formula(client, engine, models, field, value):
    text = _repetitive(engine)
    prompt = engine.prompt_ids(user(text))
    stop_ids = set(engine.stop_ids)

    def adjust(logits, answer):
        logits = logits.clone()
        if field == "repetition_penalty":
            seen = torch.tensor(sorted(set(prompt) | set(answer)))
            picked = logits[seen]
            logits[seen] = torch.where(picked > 0, picked / value, picked * value)
        for token in set(answer):
            count = answer.count(token)
            logits[token] -= value * count if field == "frequency_penalty" else value
        return logits

    expected = _reference_greedy(models[None], prompt, 12, adjust)
    if any(t in stop_ids for t in expected):
        expected = expected[: next(i for i, t in enumerate(expected) if t in stop_ids)]
    ids = _greedy(engine, text, None, max_new_tokens=12, **{field: value})
    assert ids == expected
    assert ids != _greedy(engine, text, None, max_new_tokens=12), "the penalty changed nothing"
    # through the API (repetition_penalty is vLLM's extra, sent as the openai client sends extras)
    reply = client.chat.completions.create(
        model="glm-tiny", messages=user(text), max_tokens=12, extra_body={field: value}
    )
    assert reply.choices[0].message.content == engine.tokenizer.decode(ids, skip_special_tokens=True).strip()


def test_logit_bias_and_its_bounds(client, engine):
    token = engine.tokenizer("北", add_special_tokens=False)["input_ids"][-1]
    reply = client.chat.completions.create(
        model="long", messages=user(TEXTS[1]), max_tokens=5, logit_bias={str(token): 100}
    )
    assert reply.choices[0].message.content == "北" * 5
    for bias, why in (
        ({str(token): 101}, r"\[-100, 100\]"),
        ({"99999": 1}, "not a token id"),
        ({"x": 1}, "not a token id"),
    ):
        with pytest.raises(openai.BadRequestError, match=why) as caught:
            client.chat.completions.create(model="long", messages=user("好"), max_tokens=2, logit_bias=bias)
        assert caught.value.body["param"] == "logit_bias"


def test_n_answers_follow_their_seeds(client):
    kwargs = {"model": "peft", "messages": user(TEXTS[0]), "max_tokens": 8, "temperature": 1.0, "seed": 5}
    three = client.chat.completions.create(n=3, **kwargs)
    assert [c.index for c in three.choices] == [0, 1, 2]
    alone = [
        client.chat.completions.create(**{**kwargs, "seed": 5 + i}).choices[0].message.content
        for i in range(3)
    ]
    assert [c.message.content for c in three.choices] == alone
    assert three.usage.completion_tokens == sum(
        client.chat.completions.create(**{**kwargs, "seed": 5 + i}).usage.completion_tokens for i in range(3)
    )
    streamed = list(client.chat.completions.create(n=3, stream=True, **kwargs))
    texts = ["", "", ""]
    for chunk in streamed:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    assert texts == alone
    greedy = client.chat.completions.create(model="peft", messages=user(TEXTS[0]), max_tokens=8, n=2)
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    twice = client.completions.create(model="peft", prompt=[TEXTS[0], TEXTS[1]], max_tokens=4, n=2)
    assert [c.index for c in twice.choices] == [0, 1, 2, 3]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="peft", messages=user("好"), n=9)  # MAX_BATCH_SIZE is 8
    assert caught.value.body["param"] == "n"


def test_stop_as_a_list_and_developer_messages(client, engine):
    full = (
        client.chat.completions.create(model="long", messages=user(TEXTS[2]), max_tokens=12)
        .choices[0]
        .message.content
    )
    cut = client.chat.completions.create(
        model="long", messages=user(TEXTS[2]), max_tokens=12, stop=["no such text", full[4:6]]
    ).choices[0]
    assert cut.message.content == full[: full.find(full[4:6])].rstrip() and cut.finish_reason == "stop"
    as_system = [{"role": "system", "content": "你好"}, *user(TEXTS[0])]
    as_developer = [{"role": "developer", "content": "你好"}, *user(TEXTS[0])]
    answers = [
        client.chat.completions.create(model="long", messages=m, max_tokens=6).choices[0].message.content
        for m in (as_system, as_developer)
    ]
    assert answers[0] == answers[1]


# ------------------------------------------------------------------------------------------ refusals

REFUSED_VALUES = {
    "response_format": {"type": "json_object"},
    "tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}],
    "tool_choice": "auto",
    "functions": [{"name": "f", "parameters": {}}],
    "function_call": "auto",
    "audio": {"voice": "alloy", "format": "wav"},
    "modalities": ["text", "audio"],
    "prediction": {"type": "content", "content": "x"},
    "web_search_options": {},
    "reasoning_effort": "low",
    "verbosity": "low",
    "store": True,
    "suffix": "end",
}


def test_every_refused_field_gets_a_400_naming_it(client, server):
    assert set(REFUSED_VALUES) == set(REFUSED)
    for name, value in REFUSED_VALUES.items():  # through the openai client, each as its own request field
        with pytest.raises(openai.BadRequestError) as caught:
            if name == "suffix":
                client.completions.create(model="long", prompt="好", suffix=value)
            else:
                client.chat.completions.create(model="long", messages=user("好"), extra_body={name: value})
        assert caught.value.status_code == 400 and caught.value.body["param"] == name, (
            name,
            caught.value.body,
        )
    # as typed arguments of the client
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(
            model="long", messages=user("好"), response_format={"type": "json_object"}
        )
    assert caught.value.body["param"] == "response_format" and "JSON mode" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model="long", messages=user("好"), tools=REFUSED_VALUES["tools"])
    assert caught.value.body["param"] == "tools"
    # the values that mean "none of it" are accepted
    accepted = {
        "response_format": {"type": "text"},
        "tool_choice": "none",
        "tools": [],
        "store": False,
        "modalities": ["text"],
    }
    reply = client.chat.completions.create(model="long", messages=user("好"), max_tokens=2, **accepted)
    assert reply.choices[0].finish_reason in ("stop", "length")
    cases = [
        (
            {
                "messages": [
                    {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}
                ]
            },
            "messages[0].content[0]",
        ),
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [{"type": "input_audio", "input_audio": {"data": "", "format": "wav"}}],
                    }
                ]
            },
            "messages[0].content[0]",
        ),
        ({"messages": [{"role": "user", "content": "hi", "name": "bob"}]}, "messages[0].name"),
        ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "c"}]}, "messages[0].tool_call_id"),
        ({"messages": user("好"), "top_k": 5}, "top_k"),
        ({"messages": user("好"), "top_logprobs": 2}, "top_logprobs"),
        ({"messages": user("好"), "logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"messages": user("好"), "presence_penalty": 3}, "presence_penalty"),
        ({"messages": user("好"), "repetition_penalty": 0}, "repetition_penalty"),
        ({"messages": user("好"), "service_tier": "flex"}, "service_tier"),
        ({"messages": user("好"), "stream_options": {"include_usage": True}}, "stream_options"),
    ]
    for body, param in cases:  # the client's own post, so that bodies its typed arguments refuse still go
        with pytest.raises(openai.BadRequestError) as caught:
            client.post("/chat/completions", body={"model": "long", **body}, cast_to=object)
        assert caught.value.status_code == 400 and caught.value.body["param"] == param, (
            body,
            caught.value.body,
        )
    for body, param in [
        ({}, "prompt"),
        ({"prompt": []}, "prompt"),
        ({"prompt": [1, 99999]}, "prompt"),
        ({"prompt": ["好", 3]}, "prompt[1]"),
        ({"prompt": "好", "logprobs": 21}, "logprobs"),
        ({"prompt": "好", "best_of": 3}, "best_of"),
        ({"prompt": "好", "max_tokens": 10_000}, "max_tokens"),
        ({"prompt": "好", "messages": user("好")}, "messages"),
    ]:
        with pytest.raises(openai.BadRequestError) as caught:
            client.post("/completions", body={"model": "long", **body}, cast_to=object)
        assert caught.value.status_code == 400 and caught.value.body["param"] == param, (
            body,
            caught.value.body,
        )
    assert client.completions.create(model="long", prompt="好", max_tokens=2).choices


# ---------------------------------------------------------------------------------------- bounded work


def test_requests_too_large_are_refused_fast_and_the_server_goes_on(client, engine, server):
    limits = RequestLimits.for_engine(engine)
    assert limits.max_messages < 5000 and limits.max_chars < 100_000
    cases = [
        ([{"role": "user", "content": "好"}] * 5000, "too_many_messages"),
        (user("北" * 100_000), "context_length_exceeded"),
    ]
    for messages, code in cases:
        with pytest.raises(openai.BadRequestError) as caught:
            client.chat.completions.create(model="long", messages=messages, max_tokens=2)
        assert caught.value.body["param"] == "messages" and caught.value.body["code"] == code
        # The server's own time, over plain HTTP: the openai client alone spends ~0.9 s building a request of 5,000
        # messages. Refused before rendering, it takes milliseconds; rendering them would take minutes.
        body = json.dumps({"model": "long", "messages": messages, "max_tokens": 2}).encode()
        started = time.monotonic()
        status, _ = _raw_post(f"{server.url}/chat/completions", body)
        elapsed = time.monotonic() - started
        assert status == 400 and elapsed < 1.0, f"refused after {elapsed:.2f} s"
        assert client.chat.completions.create(model="long", messages=user("好"), max_tokens=2).choices
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="long", prompt="北" * 100_000)
    assert caught.value.body["param"] == "prompt"
    # a body declared past the limit: 413 from its Content-Length, before the body is read at all
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    connection.putrequest("POST", "/v1/chat/completions")
    connection.putheader("Content-Type", "application/json")
    connection.putheader("Content-Length", str(limits.max_body_bytes + 1))
    connection.endheaders()
    connection.send(b"{")
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
    connection.close()
    # and one sent in chunks (no length declared): read no further than the limit
    chunks = iter([b" " * (1 << 20)] * (limits.max_body_bytes // (1 << 20) + 2))
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    try:
        connection.request("POST", "/v1/chat/completions", body=chunks, encode_chunked=True)
        response = connection.getresponse()
        assert response.status == 413
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered 413 and closed while the client was still sending
    finally:
        connection.close()
    assert client.chat.completions.create(model="long", messages=user("好"), max_tokens=2).choices


def test_limits_are_configurable(engine):
    server = ServerThread(create_app(engine, limits=RequestLimits(max_messages=3, max_chars=20)))
    try:
        client = openai.OpenAI(base_url=server.url, api_key="unused", max_retries=0)
        with pytest.raises(openai.BadRequestError, match="at most 3 per request"):
            client.chat.completions.create(model="long", messages=user("好") * 4, max_tokens=2)
        with pytest.raises(openai.BadRequestError, match="more than 20 characters"):
            client.chat.completions.create(model="long", messages=user("好" * 21), max_tokens=2)
        assert client.chat.completions.create(model="long", messages=user("好") * 3, max_tokens=2).choices
    finally:
        server.stop()
    with pytest.raises(ValueError, match="max_request_chars"):
        RequestLimits.for_engine(engine, max_chars=0)


def test_log_likelihood_is_finite_for_every_prompt_token(client):
    reply = client.completions.create(model="long", prompt=TEXTS[5], max_tokens=0, echo=True, logprobs=0)
    assert all(math.isfinite(x) and x <= 0 for x in reply.choices[0].logprobs.token_logprobs[1:])
    assert reply.choices[0].text == TEXTS[5] and reply.usage.completion_tokens == 0


def test_identifiers_are_accepted_and_change_nothing(client):
    base = {"model": "long", "messages": user(TEXTS[3]), "max_tokens": 6}
    expected = client.chat.completions.create(**base).choices[0].message.content
    accepted = {
        "user": "u-1",
        "safety_identifier": "s-1",
        "prompt_cache_key": "k",
        "metadata": {"run": "1"},
        "service_tier": "auto",
        "parallel_tool_calls": False,
        "store": False,
    }
    for name, value in accepted.items():
        reply = client.chat.completions.create(**base, **{name: value})
        assert reply.choices[0].message.content == expected, name
    capped = client.chat.completions.create(model="long", messages=user(TEXTS[3]), max_completion_tokens=2)
    assert capped.usage.completion_tokens <= 2
    legacy = {"model": "long", "prompt": TEXTS[3], "max_tokens": 6}
    text = client.completions.create(**legacy).choices[0].text
    assert client.completions.create(**legacy, best_of=1, user="u").choices[0].text == text
