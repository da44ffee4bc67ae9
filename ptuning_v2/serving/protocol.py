"""OpenAI's request bodies, checked: every field OpenAI defines for ``/v1/chat/completions`` and
``/v1/completions`` is honoured or refused with a 400 naming it (``param``), never silently ignored, and the work a
request causes before it is refused is bounded (``RequestLimits``, checked before anything is rendered).

What the server does with each field is declared once, in ``HONOURED`` and ``REFUSED``; the README's parameter
table lists the same (a test compares them).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .engine import Engine, PrefixTable, SamplingParams

MAX_STOP_STRINGS = 4  # as OpenAI
MAX_LOGPROBS = 20  # top alternatives per token, as OpenAI's top_logprobs
# Rendering a conversation checks that the chat template only ever appends, which costs time quadratic in the
# number of messages (about 0.5 s for 256 short messages on 2 CPU cores): a default cap keeps that bounded.
MAX_MESSAGES_CAP = 256
LEGACY_MAX_TOKENS = 16  # /v1/completions' default, as OpenAI's

# field -> what the server does with it (the README's table says the same in words).
_BOTH = {
    "model": "picks the prefix by name; the backbone's name means none",
    "max_tokens": "the most new tokens",
    "temperature": "sampling temperature; 0 (or neither it nor top_p given) is greedy",
    "top_p": "nucleus sampling",
    "seed": "a sampled answer is reproducible; choice i of n uses seed + i",
    "stop": "up to 4 strings; the answer ends before the first one",
    "stream": "server-sent events",
    "stream_options": "include_usage adds a last chunk with the usage",
    "n": "n answers to one prompt (at most MAX_BATCH_SIZE), decoded in one batch",
    "presence_penalty": "OpenAI's: minus this once per token already in the answer",
    "frequency_penalty": "OpenAI's: minus this per earlier occurrence in the answer",
    "repetition_penalty": "vLLM's extra: logits of tokens in the prompt or answer divided (>0) or multiplied",
    "logit_bias": "added to the named token ids' logits (-100..100)",
    "user": "accepted; an identifier that changes nothing in the answer and is not stored",
    "safety_identifier": "as user",
    "prompt_cache_key": "accepted; changes nothing (every prompt runs afresh)",
    "metadata": "accepted; not stored (nothing is: see store)",
    "service_tier": "'auto' or 'default' only",
}
HONOURED: dict[str, dict[str, str]] = {
    "chat": {
        **_BOTH,
        "messages": "system, developer (as system), user and assistant turns; text content or text parts",
        "max_completion_tokens": "as max_tokens",
        "logprobs": "true: each answer token's log-probability under the model (before penalties and sampling)",
        "top_logprobs": "0..20 likeliest alternatives per token, with logprobs",
        "parallel_tool_calls": "accepted; means nothing without tools, which are refused",
    },
    "completions": {
        **_BOTH,
        "prompt": "a string, a list of strings, token ids or a list of them; one choice per prompt (and n)",
        "echo": "the prompt comes back before the answer (with logprobs: the prompt tokens' too)",
        "logprobs": "0..20: each token's log-probability and that many likeliest alternatives",
        "best_of": "1 (or equal to n) only",
    },
}


def _absent(value: Any) -> bool:
    return value is None or value is False or value == [] or value == {}


# field -> (the values that are accepted, why others are refused)
REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "response_format": (
        lambda v: v is None or v == {"type": "text"},
        "only {'type': 'text'} is supported: this server has no JSON mode or structured outputs",
    ),
    "tools": (_absent, "tool calls are not supported"),
    "tool_choice": (lambda v: v in (None, "none"), "tool calls are not supported"),
    "functions": (_absent, "function calls are not supported"),
    "function_call": (lambda v: v in (None, "none"), "function calls are not supported"),
    "audio": (lambda v: v is None, "audio output is not supported"),
    "modalities": (lambda v: v in (None, ["text"]), "only the text modality is supported"),
    "prediction": (lambda v: v is None, "predicted outputs are not supported"),
    "web_search_options": (lambda v: v is None, "web search is not supported"),
    "reasoning_effort": (lambda v: v is None, "this is not a reasoning model"),
    "verbosity": (lambda v: v is None, "verbosity is not supported"),
    "store": (lambda v: v in (None, False), "completions are not stored"),
    "suffix": (lambda v: v is None, "suffix (insertion) is not supported"),
}


class APIError(Exception):
    """A request the server refuses; rendered in OpenAI's error shape."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class RequestLimits:
    """The most a request may hold, checked before its conversation is rendered or tokenized."""

    max_messages: int
    max_chars: int  # characters of message contents or prompts, all together

    @property
    def max_body_bytes(self) -> int:
        # JSON writes a character in at most 6 bytes (\\uXXXX); each message adds its role and punctuation.
        return 6 * self.max_chars + 200 * self.max_messages + (1 << 20)

    @classmethod
    def for_engine(
        cls, engine: Engine, max_messages: int | None = None, max_chars: int | None = None
    ) -> RequestLimits:
        """Defaults that fit the engine's context: no more messages than could fit (each costs at least the
        tokens of an empty one; at most ``MAX_MESSAGES_CAP``), no more characters than ``context`` of the
        tokenizer's longest tokens could spell."""
        if max_messages is None:
            max_messages = min(MAX_MESSAGES_CAP, engine.context_length // _fewest_tokens_per_message(engine))
        if max_chars is None:
            max_chars = engine.context_length * _longest_token_chars(engine.tokenizer)
        for name, value in (("max_request_messages", max_messages), ("max_request_chars", max_chars)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        return cls(max_messages, max_chars)


def _fewest_tokens_per_message(engine: Engine) -> int:
    """What one more empty message adds to a prompt, for the cheapest role the chat template takes (at least 1)."""
    base = [{"role": "user", "content": "a"}]
    length = len(engine.prompt_ids(base))
    added = []
    for role in ("system", "user", "assistant"):
        try:
            added.append(len(engine.prompt_ids([*base, {"role": role, "content": ""}])) - length)
        except ValueError:  # a template without this role, or the plain format's strict alternation
            continue
    return max(1, min(added, default=1))


def _longest_token_chars(tokenizer: Any) -> int:
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return max((len(p) for p in pieces if isinstance(p, str)), default=1)


# --------------------------------------------------------------------------------------------- fields


def check_fields(body: Any, endpoint: str) -> dict[str, Any]:
    """The body as a dict whose every field is honoured here; 400 naming the first refused or unknown one."""
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    for name, value in body.items():
        if name in HONOURED[endpoint]:
            continue
        if name in REFUSED:
            accepted, why = REFUSED[name]
            if accepted(value):
                continue
            raise APIError(400, f"'{name}' = {json.dumps(value)[:80]} is not supported: {why}", name)
        raise APIError(400, f"Unrecognized request argument supplied: {name}", name)
    return body


def _number(
    body: dict[str, Any], name: str, low: float, high: float, low_inclusive: bool = True
) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise APIError(400, f"'{name}' must be a number, got {json.dumps(value)}", name)
    if not ((value >= low if low_inclusive else value > low) and value <= high):
        bracket = "[" if low_inclusive else "("
        raise APIError(400, f"'{name}' must be in {bracket}{low}, {high}], got {value}", name)
    return float(value)


def _integer(body: dict[str, Any], name: str, low: int | None = None, high: int | None = None) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'{name}' must be an integer, got {json.dumps(value)}", name)
    if low is not None and value < low:
        raise APIError(400, f"'{name}' must be at least {low}, got {value}", name)
    if high is not None and value > high:
        raise APIError(400, f"'{name}' must be at most {high}, got {value}", name)
    return value


def _boolean(body: dict[str, Any], name: str) -> bool:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise APIError(400, f"'{name}' must be true or false, got {json.dumps(value)}", name)
    return bool(value)


def _stop(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or not all(isinstance(s, str) and s for s in stops):
        raise APIError(400, "'stop' must be a non-empty string or an array of them", "stop")
    if len(stops) > MAX_STOP_STRINGS:
        raise APIError(400, f"'stop' takes at most {MAX_STOP_STRINGS} strings, got {len(stops)}", "stop")
    return stops


def _logit_bias(body: dict[str, Any], vocab_size: int) -> dict[int, float]:
    bias = body.get("logit_bias")
    if bias is None:
        return {}
    if not isinstance(bias, dict):
        raise APIError(400, "'logit_bias' must be an object of token id -> bias", "logit_bias")
    checked = {}
    for key, value in bias.items():
        token = int(key) if isinstance(key, str) and key.strip().isdigit() else None
        if token is None or token >= vocab_size:
            raise APIError(
                400,
                f"'logit_bias' key {key!r} is not a token id of this model (0..{vocab_size - 1})",
                "logit_bias",
            )
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise APIError(
                400, f"'logit_bias'[{key!r}] must be a number in [-100, 100], got {value!r}", "logit_bias"
            )
        checked[token] = float(value)
    return checked


def _model(engine: Engine, body: dict[str, Any]) -> tuple[str, PrefixTable | None]:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise APIError(400, "'model' is a required property (a string)", "model")
    try:
        return model, engine.resolve_prefix(model)  # the request's model, resolved once: a table or none
    except ValueError:
        known = ", ".join([engine.model_name, *engine.prefix_names])
        raise APIError(
            404, f"The model '{model}' does not exist; loaded: {known}", "model", "model_not_found"
        ) from None


def _context_exceeded(engine: Engine, prompt_tokens: int, max_tokens: int | None, param: str) -> APIError:
    if max_tokens is None:
        asked = f"your prompt resulted in {prompt_tokens} tokens. Please reduce the length of the prompt."
    else:
        asked = (
            f"you requested {prompt_tokens + max_tokens} tokens ({prompt_tokens} in the prompt, {max_tokens} in "
            "the completion). Please reduce the length of the prompt or completion."
        )
    return APIError(
        400,
        f"This model's maximum context length is {engine.context_length} tokens. However, {asked}",
        param,
        "context_length_exceeded",
    )


@dataclass
class CommonSettings:
    """What both endpoints take: the sampling of each of the n answers, streaming, and the model."""

    model: str
    prefix: PrefixTable | None
    params: SamplingParams  # choice 0's; choice i's seed is seed + i
    n: int
    stream: bool
    include_usage: bool

    def choice_params(self, index: int) -> SamplingParams:
        if self.params.seed is None or index == 0:
            return self.params
        return SamplingParams(**{**vars(self.params), "seed": self.params.seed + index})


def _common(
    engine: Engine, body: dict[str, Any], max_tokens_name: str, allow_zero_tokens: bool
) -> CommonSettings:
    model, prefix = _model(engine, body)
    max_tokens = _integer(body, max_tokens_name, low=0 if allow_zero_tokens else 1)
    n = _integer(body, "n", low=1, high=engine.max_batch_size) or 1
    best_of = _integer(body, "best_of", low=1)
    if best_of not in (None, 1, n):
        raise APIError(400, f"'best_of' must be 1 or n ({n}): answers are not ranked here", "best_of")
    temperature = _number(body, "temperature", 0.0, 2.0)
    top_p = _number(body, "top_p", 0.0, 1.0, low_inclusive=False)
    options = body.get("stream_options") or {}
    if not isinstance(options, dict) or set(options) - {"include_usage", "include_obfuscation"}:
        raise APIError(400, "'stream_options' must be an object with include_usage", "stream_options")
    if options and not _boolean(body, "stream"):  # as OpenAI: it would mean nothing
        raise APIError(400, "'stream_options' is only allowed when 'stream' is true", "stream_options")
    service_tier = body.get("service_tier")
    if service_tier not in (None, "auto", "default"):
        raise APIError(
            400, f"'service_tier' {json.dumps(service_tier)} is not offered; use 'auto'", "service_tier"
        )
    defaults = SamplingParams()
    params = SamplingParams(
        max_new_tokens=max_tokens,  # None until _fit knows the room the prompt leaves
        do_sample=(temperature is not None or top_p is not None) and temperature != 0.0,
        temperature=defaults.temperature if temperature is None else temperature,
        top_p=defaults.top_p if top_p is None else top_p,
        seed=_integer(body, "seed"),
        stop=_stop(body),
        presence_penalty=_number(body, "presence_penalty", -2.0, 2.0) or 0.0,
        frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0) or 0.0,
        repetition_penalty=_number(body, "repetition_penalty", 0.0, 2.0, low_inclusive=False) or 1.0,
        logit_bias=_logit_bias(body, engine.vocab_size),
    )
    return CommonSettings(
        model, prefix, params, n, _boolean(body, "stream"), bool(options.get("include_usage"))
    )


def _fit(
    engine: Engine,
    settings: CommonSettings,
    prompts: list[list[int]],
    param: str,
    max_tokens_name: str,
    default_budget: int,
) -> None:
    """Refuse a prompt that leaves no room, or a budget asked beyond it; an unset budget is the default, capped at
    the room the longest prompt leaves."""
    longest = max(len(ids) for ids in prompts)
    room = engine.context_length - longest
    wanted = settings.params.max_new_tokens
    if room < 1:
        raise _context_exceeded(engine, longest, None, param)
    if wanted is None:
        settings.params.max_new_tokens = min(default_budget, room)
    elif wanted > room:
        raise _context_exceeded(engine, longest, wanted, max_tokens_name)


# ------------------------------------------------------------------------------------------- chat


def _messages(body: dict[str, Any], limits: RequestLimits) -> list[dict[str, str]]:
    """OpenAI messages -> ``{role, content}`` with text content; the limits are checked before anything else."""
    if "messages" not in body:
        raise APIError(400, "'messages' is a required property", "messages")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty array of {role, content} objects", "messages")
    if len(messages) > limits.max_messages:
        raise APIError(
            400,
            f"'messages' holds {len(messages)} messages; this server takes at most {limits.max_messages} per "
            "request (MAX_REQUEST_MESSAGES)",
            "messages",
            "too_many_messages",
        )
    plain, chars = [], 0
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise APIError(400, f"messages[{i}] must be an object with role and content", f"messages[{i}]")
        for field in set(message) - {"role", "content"}:
            if field in ("tool_calls", "function_call") and _absent(message[field]):
                continue
            raise APIError(
                400,
                f"messages[{i}].{field} is not supported (only role and content are)",
                f"messages[{i}].{field}",
            )
        role, content = message.get("role"), message.get("content")
        if role in ("tool", "function"):
            raise APIError(
                400, f"messages[{i}].role '{role}': tool calls are not supported", f"messages[{i}].role"
            )
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text" or not isinstance(part.get("text"), str) or set(part) - {"type", "text"}:
                    raise APIError(
                        400,
                        f"messages[{i}].content[{j}] of type {json.dumps(kind)}: only text parts are supported",
                        f"messages[{i}].content[{j}]",
                    )
            content = "".join(part["text"] for part in content)
        elif content is None and role == "assistant":
            content = ""
        chars += len(content) if isinstance(content, str) else 0
        if chars > limits.max_chars:
            raise APIError(
                400,
                f"the messages hold more than {limits.max_chars} characters (at messages[{i}]); this server takes "
                "at most that many per request (MAX_REQUEST_CHARS)",
                "messages",
                "context_length_exceeded",
            )
        plain.append({"role": "system" if role == "developer" else role, "content": content})
    return plain


class ChatRequest:
    """A checked ``/v1/chat/completions`` body: the prompt ids, the prefix and the sampling settings."""

    def __init__(self, engine: Engine, body: Any, limits: RequestLimits) -> None:
        body = check_fields(body, "chat")
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        self.settings = _common(engine, body, name, allow_zero_tokens=False)
        messages = _messages(body, limits)
        try:
            self.prompt_ids = engine.prompt_ids(messages)
        except ValueError as err:
            raise APIError(400, str(err), "messages") from err
        _fit(engine, self.settings, [self.prompt_ids], "messages", name, SamplingParams().max_new_tokens)
        top = _integer(body, "top_logprobs", low=0, high=MAX_LOGPROBS)
        if top is not None and not body.get("logprobs"):
            raise APIError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        if _boolean(body, "logprobs"):
            self.settings.params.logprobs = top or 0


# -------------------------------------------------------------------------------------- completions


def _is_token_ids(value: Any) -> bool:
    """A non-empty list of integers (JSON's true/false are not token ids)."""
    return isinstance(value, list) and bool(value) and all(type(t) is int for t in value)


def _prompts(
    engine: Engine, body: dict[str, Any], limits: RequestLimits
) -> tuple[list[list[int]], list[str]]:
    """``prompt`` as ids and as text, one per prompt: a string, strings, token ids, or lists of token ids."""
    if "prompt" not in body:
        raise APIError(400, "'prompt' is a required property", "prompt")
    prompt = body["prompt"]
    many = [prompt] if isinstance(prompt, str) or _is_token_ids(prompt) else prompt
    if not isinstance(many, list) or not many:
        raise APIError(
            400, "'prompt' must be a string, an array of strings or token ids, or arrays of them", "prompt"
        )
    if len(many) > limits.max_messages:
        raise APIError(400, f"'prompt' holds {len(many)} prompts; at most {limits.max_messages}", "prompt")
    ids, texts, chars = [], [], 0
    for i, item in enumerate(many):
        where = "prompt" if len(many) == 1 else f"prompt[{i}]"
        if isinstance(item, str):
            chars += len(item)
            if chars > limits.max_chars:
                raise APIError(
                    400,
                    f"the prompts hold more than {limits.max_chars} characters (MAX_REQUEST_CHARS)",
                    "prompt",
                )
            ids.append(engine.tokenizer(item)["input_ids"])
            texts.append(item)
        elif _is_token_ids(item):
            if len(item) > engine.context_length:
                raise _context_exceeded(engine, len(item), None, where)
            bad = [t for t in item if not 0 <= t < engine.vocab_size]
            if bad:
                raise APIError(
                    400, f"{where}: token id {bad[0]} is outside 0..{engine.vocab_size - 1}", where
                )
            ids.append(list(item))
            texts.append(engine.tokenizer.decode(item))
        else:
            raise APIError(400, f"{where} must be a non-empty string or an array of token ids", where)
        if not ids[-1]:
            raise APIError(400, f"{where} is empty", where)
    return ids, texts


class CompletionRequest:
    """A checked ``/v1/completions`` body: the prompts (ids and text), the prefix, sampling, echo and logprobs."""

    def __init__(self, engine: Engine, body: Any, limits: RequestLimits) -> None:
        body = check_fields(body, "completions")
        self.settings = _common(engine, body, "max_tokens", allow_zero_tokens=True)
        self.prompt_ids, self.prompt_texts = _prompts(engine, body, limits)
        _fit(engine, self.settings, self.prompt_ids, "prompt", "max_tokens", LEGACY_MAX_TOKENS)
        self.echo = _boolean(body, "echo")
        logprobs = _integer(body, "logprobs", low=0, high=MAX_LOGPROBS)
        params = self.settings.params
        params.logprobs = logprobs
        if self.echo and logprobs is not None:
            params.prompt_logprobs = logprobs
        if params.max_new_tokens == 0:  # nothing to generate: the prompt is scored (or just echoed)
            params.prompt_logprobs = logprobs or 0
