"""What a request is made of: its messages (checked), its sampling settings, and the channel its text comes back
through, read by the caller as a ``Generation`` while the worker decodes it as a ``Request``."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data import ROLES
from ..generation import GenerationSettings
from .tables import PrefixTable


@dataclass
class SamplingParams:
    """One request's sampling; the defaults are ``GenerationSettings``' (declared there once)."""

    max_new_tokens: int = GenerationSettings.max_new_tokens
    do_sample: bool = GenerationSettings.do_sample  # greedy unless asked
    temperature: float = GenerationSettings.temperature
    top_p: float = GenerationSettings.top_p
    seed: int | None = None  # per request: same seed -> same sample, whatever else is in the batch
    stop: list[str] = field(default_factory=list)
    # OpenAI's: minus frequency_penalty per earlier occurrence in the answer, minus presence_penalty once.
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # vLLM's and transformers': logits of tokens seen in the prompt or the answer divided (>0) or multiplied.
    repetition_penalty: float = 1.0
    logit_bias: dict[int, float] = field(default_factory=dict)  # token id -> added to its logit
    # Log-probabilities of the model's own distribution (before penalties, bias and temperature):
    # None for none, k >= 0 for the chosen token's and the k likeliest alternatives'.
    logprobs: int | None = None
    prompt_logprobs: int | None = None  # the same for every prompt token after the first

    def check(self) -> None:
        """ValueError naming the first bad field."""
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise ValueError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if self.max_new_tokens < (0 if self.prompt_logprobs is not None else 1):
            raise ValueError(
                f"max_new_tokens must be at least 1 (0 only to score the prompt, with prompt_logprobs), "
                f"got {self.max_new_tokens}"
            )
        if not 0.0 <= float(self.temperature) <= 100.0:
            raise ValueError(f"temperature must be between 0 and 100, got {self.temperature}")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")
        if not float(self.repetition_penalty) > 0:
            raise ValueError(f"repetition_penalty must be above 0, got {self.repetition_penalty}")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be None or an integer >= 0, got {value!r}")

    @property
    def adjusts_logits(self) -> bool:
        return bool(self.logit_bias) or (
            self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0
        )


def check_messages(messages: Any) -> list[dict[str, str]]:
    """Plain ``{role, content}`` copies of well-formed messages; ValueError naming the first bad one."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages must be a non-empty list of {role, content} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ValueError(f"messages[{i}] must be an object with role and content")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role is {role!r}; expected one of {list(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string, got {type(content).__name__}")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


@dataclass
class TokenLogprob:
    """One token's log-probability and the likeliest alternatives' at its position, ``(token id, logprob)``."""

    token: int
    logprob: float
    top: list[tuple[int, float]] = field(default_factory=list)


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length" | "cancelled"
    token_ids: list[int] = field(default_factory=list)  # generated, without the stop token
    logprobs: list[TokenLogprob] = field(default_factory=list)  # one per token id, when asked


_END = object()


class Channel:
    """What the worker writes for one request: text deltas, then the end (or an error), and the counts."""

    def __init__(self, loop: Any = None) -> None:
        self.loop = loop
        self.events: Any = queue.SimpleQueue() if loop is None else asyncio.Queue()
        self.finish_reason: str | None = None
        self.token_ids: list[int] = []
        # Appended by the worker before the text delta that carries the token is put, so a reader that got a
        # delta finds its tokens' entries here.
        self.logprobs: list[TokenLogprob] = []
        self.prompt_logprobs: list[TokenLogprob | None] = []  # the first prompt token has none

    def put(self, item: Any) -> None:
        if self.loop is None:
            self.events.put(item)
        else:
            try:
                self.loop.call_soon_threadsafe(self.events.put_nowait, item)
            except RuntimeError:  # the event loop has closed: nobody is listening any more
                pass

    def finish(self, reason: str, token_ids: list[int]) -> None:
        self.finish_reason, self.token_ids = reason, token_ids
        self.put(_END)

    def fail(self, error: BaseException) -> None:
        self.finish_reason = "error"
        self.put(error)


class Generation:
    """A request in flight: iterate it (``for``, or ``async for`` when submitted with an event loop) for its
    text deltas; once it ends, ``finish_reason`` ("stop", "length", "cancelled") and ``completion_tokens`` are
    set. ``cancel()``, or dropping it unfinished, frees its batch slot at the next decoding step."""

    def __init__(self, prompt_tokens: int, cancel: threading.Event, channel: Channel) -> None:
        self.prompt_tokens = prompt_tokens
        self._cancel = cancel
        self._channel = channel

    @property
    def finish_reason(self) -> str | None:
        return self._channel.finish_reason

    @property
    def completion_tokens(self) -> int:
        return len(self._channel.token_ids)

    @property
    def token_ids(self) -> list[int]:
        """The generated token ids (without the stop token), once finished."""
        return self._channel.token_ids

    @property
    def logprobs(self) -> list[TokenLogprob]:
        """One entry per generated token so far (``SamplingParams.logprobs``), in order."""
        return self._channel.logprobs

    @property
    def prompt_logprobs(self) -> list[TokenLogprob | None]:
        """One entry per prompt token (None for the first), once the prompt ran (``prompt_logprobs``)."""
        return self._channel.prompt_logprobs

    def cancel(self) -> None:
        self._cancel.set()

    def __iter__(self) -> Generation:
        if self._channel.loop is not None:
            raise TypeError("this generation was submitted with an event loop: use `async for`")
        return self

    def __next__(self) -> str:
        return self._unpack(self._channel.events.get(), StopIteration)

    def __aiter__(self) -> Generation:
        if self._channel.loop is None:
            raise TypeError("this generation was submitted without an event loop: use `for`")
        return self

    async def __anext__(self) -> str:
        return self._unpack(await self._channel.events.get(), StopAsyncIteration)

    def _unpack(self, item: Any, stop: type[Exception]) -> str:
        if item is _END:
            self._channel.events.put_nowait(_END)  # stays exhausted for a second read
            raise stop
        if isinstance(item, BaseException):
            raise item
        return item

    def __del__(self) -> None:
        # Dropped unfinished (a caller that stopped reading): free the slot rather than decode for nobody.
        if self._channel.finish_reason is None:
            self._cancel.set()


@dataclass
class Request:
    """A request as the worker holds it: its prompt, prefix and sampling, and what it has generated so far."""

    ids: list[int]
    prefix: PrefixTable | None
    params: SamplingParams
    cancel: threading.Event
    out: Channel
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the answer already emitted
    pending: TokenLogprob | None = None  # the next token's log-probabilities, kept if the token is


class RequestQueue:
    """Requests from any thread, waiting for the one worker; ``close()`` wakes the worker and ends it."""

    def __init__(self) -> None:
        self._queue: queue.SimpleQueue[Request | None] = queue.SimpleQueue()
        self.closed = threading.Event()

    def put(self, request: Request) -> None:
        self._queue.put(request)

    def close(self) -> None:
        self.closed.set()
        self._queue.put(None)  # wakes a worker blocked in take()

    def take(self, block: bool, room: int, wait: float) -> list[Request]:
        """Requests waiting now (up to ``room``); when idle, block for the first and wait ``wait`` s for more."""
        taken: list[Request] = []
        deadline = None
        while len(taken) < room:
            try:
                if block and not taken:
                    item = self._queue.get()
                    deadline = time.monotonic() + wait
                elif deadline is not None:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                else:
                    item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:  # close()
                self.closed.set()
                break
            taken.append(item)
        return taken

    def drain(self) -> None:
        """End every request still waiting as cancelled (the engine is closing)."""
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item.out.finish("cancelled", [])
