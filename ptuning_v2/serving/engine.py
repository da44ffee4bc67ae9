"""Conversation -> prompt ids -> generated text, streamed, for many prefixes on one frozen backbone.

A prefix is only a key/value table placed in front of the cache, so the engine keeps one bare backbone and, per
prefix, the table it computes (once, at load: eval mode, so no dropout; a projection MLP is run once and
dropped). Requests from any thread go into a queue; one worker thread batches whatever is waiting, requests for
different prefixes and for none in the same batch, and decodes one token per step for all of them:

- each row of the cache starts with its own prefix, right-aligned in a prefix block as wide as the longest prefix
  in the batch; the slots a shorter (or no) prefix leaves free are masked out, as is the left padding of the
  prompts;
- positions count a row's real tokens only, from 0 (ChatGLM's convention) or from its prefix length (PEFT's), as
  ``attach_prefix`` does, so a row computes what it computes alone;
- each row has its own sampling (temperature, top_p, its own seeded ``torch.Generator``), stop tokens, stop
  strings and token budget; a row that finishes or is cancelled leaves the batch at once, and requests that
  arrive meanwhile join it after their own prefill.
"""

from __future__ import annotations

import asyncio
import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jinja2 import TemplateError
from torch import nn
from transformers.cache_utils import DynamicCache

from ..checkpoint import PREFIX_METHODS, checkpoint_method, load_prefix_checkpoint, read_tuning_checkpoint
from ..compat import cache_argument, output_cache
from ..data import ROLES, generation_prompt_ids
from ..generation import GenerationSettings, stop_token_ids
from ..loading import load_model, load_tokenizer, quantization_config
from ..methods import method_class, method_config
from ..methods.prefix import load_prefix_into_encoder
from ..methods.virtual_tokens import VirtualTokenMethod, virtual_token_table
from ..prefix_encoder import KVShape, PrefixEncoder, kv_shape_from_config

# generation_prompt_ids cuts long prompts to this many tokens; the engine wants them whole so that a prompt too
# long for the context is refused, not silently shortened.
_NO_TRUNCATION = 1 << 40


@dataclass
class SamplingParams:
    """One request's sampling; the defaults are ``GenerationSettings``' (declared there once)."""

    max_new_tokens: int = GenerationSettings.max_new_tokens
    do_sample: bool = GenerationSettings.do_sample  # greedy unless asked
    temperature: float = GenerationSettings.temperature
    top_p: float = GenerationSettings.top_p
    seed: int | None = None  # per request: same seed -> same sample, whatever else is in the batch
    stop: list[str] = field(default_factory=list)

    def check(self) -> None:
        """ValueError naming the first bad field."""
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int):
            raise ValueError(f"max_new_tokens must be an integer, got {self.max_new_tokens!r}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if not 0.0 <= float(self.temperature) <= 100.0:
            raise ValueError(f"temperature must be between 0 and 100, got {self.temperature}")
        if not 0.0 < float(self.top_p) <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed must be an integer, got {self.seed!r}")
        if not isinstance(self.stop, list) or not all(isinstance(s, str) and s for s in self.stop):
            raise ValueError(f"stop must be a list of non-empty strings, got {self.stop!r}")


@dataclass
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" | "length" | "cancelled"
    token_ids: list[int] = field(default_factory=list)  # generated, without the stop token


@dataclass
class PrefixTable:
    """One loaded prefix: per layer, keys and values ``(num_kv_heads, pre_seq_len, head_dim)``."""

    name: str
    path: str
    source: str  # the checkpoint's format: "ptuning_v2", "chatglm" or "peft"
    position_convention: str
    keys: list[torch.Tensor]
    values: list[torch.Tensor]

    @property
    def length(self) -> int:
        return self.keys[0].shape[1]


def load_prefix_table(
    name: str, path: str, kv_shape: KVShape, dtype: torch.dtype, device: torch.device, backbone: nn.Module
) -> PrefixTable:
    """Read a checkpoint whose method acts as a key/value prefix at inference and compute its table.

    P-Tuning v2 / Prefix-Tuning checkpoints (any format) hold the table (a projection MLP is run once); P-Tuning v1
    / Prompt Tuning virtual tokens are run through the backbone once (attention is causal, so their keys and values
    are all later tokens see of them) and serve as a prefix whose real tokens start at position P. ValueError
    naming the checkpoint when it does not fit.
    """
    method = checkpoint_method(path)
    if method in PREFIX_METHODS:
        checkpoint = load_prefix_checkpoint(path)
        try:
            encoder = load_prefix_into_encoder(checkpoint, PrefixEncoder(checkpoint.config, kv_shape)).eval()
        except ValueError as err:
            raise ValueError(f"prefix {name!r}: {err}") from err
        with torch.no_grad():
            table = encoder.table().float()
        # (P, kv_size) -> (2L, kv_heads, P, head_dim): slot 2i is layer i's key, 2i+1 its value (see PrefixEncoder).
        slots = table.view(table.shape[0], 2 * kv_shape.num_layers, kv_shape.num_kv_heads, kv_shape.head_dim)
        slots = slots.to(dtype).permute(1, 2, 0, 3).contiguous().to(device)
        pairs = [(slots[2 * i], slots[2 * i + 1]) for i in range(kv_shape.num_layers)]
        source, convention = checkpoint.source, checkpoint.config.position_convention
    else:
        cls = method_class(method)
        if not issubclass(cls, VirtualTokenMethod):
            raise ValueError(
                f"prefix {name!r}: {path} is a {method} checkpoint, which changes the backbone's weights; it cannot "
                "share a backbone with other checkpoints. Serve it alone (its only checkpoint), or as the --model"
            )
        checkpoint = read_tuning_checkpoint(path)
        try:
            config = method_config(method, checkpoint.meta)
            pairs = virtual_token_table(backbone, checkpoint, cls, config)
        except (TypeError, ValueError) as err:
            raise ValueError(f"prefix {name!r}: {err}") from err
        pairs = [(k.to(dtype).contiguous(), v.to(dtype).contiguous()) for k, v in pairs]
        source, convention = method, "peft"  # the virtual tokens hold positions 0..P-1
    return PrefixTable(
        name=name,
        path=str(path),
        source=source,
        position_convention=convention,
        keys=[k for k, _ in pairs],
        values=[v for _, v in pairs],
    )


def _is_prefix_like(path: str) -> bool:
    """Whether a checkpoint acts as a key/value prefix at inference (so many share one backbone)."""
    method = checkpoint_method(path)
    return method in PREFIX_METHODS or issubclass(method_class(method), VirtualTokenMethod)


# ------------------------------------------------------------------------------------------------ requests

_END = object()


class _Channel:
    """What the worker writes for one request: text deltas, then the end (or an error), and the counts."""

    def __init__(self, loop: Any = None) -> None:
        self.loop = loop
        self.events: Any = queue.SimpleQueue() if loop is None else asyncio.Queue()
        self.finish_reason: str | None = None
        self.token_ids: list[int] = []

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

    def __init__(self, prompt_tokens: int, cancel: threading.Event, channel: _Channel) -> None:
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
class _Request:
    ids: list[int]
    prefix: PrefixTable | None
    params: SamplingParams
    cancel: threading.Event
    out: _Channel
    generator: torch.Generator | None = None
    tokens: list[int] = field(default_factory=list)
    sent: int = 0  # characters of the answer already emitted


# --------------------------------------------------------------------------------------------------- engine


class Engine:
    """One frozen backbone and N named prefixes, served from one worker thread that batches across prefixes."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        prefixes: dict[str, PrefixTable],
        model_name: str,
        max_batch_size: int = 16,
        batch_wait_ms: float = 10.0,
    ) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be at least 1, got {max_batch_size}")
        if batch_wait_ms < 0:
            raise ValueError(f"batch_wait_ms must be >= 0, got {batch_wait_ms}")
        if model_name in prefixes:
            raise ValueError(f"prefix name {model_name!r} is the backbone's name; choose another")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.prefixes = prefixes
        self.model_name = model_name
        self.prefix_names = list(prefixes)
        self.max_batch_size = max_batch_size
        self.batch_wait = batch_wait_ms / 1000.0
        self.context_length = _context_length(model, tokenizer)
        self.stop_ids = stop_token_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.device = model.get_input_embeddings().weight.device
        self._cache_argument = cache_argument(model)
        self._keep_last = "logits_to_keep" in _forward_parameters(model)
        # For tests, benchmarks and /health: prefill forwards, decoding steps, the most rows decoded together,
        # the rows being decoded now, requests cancelled.
        self.stats = {"prefills": 0, "steps": 0, "max_rows": 0, "running": 0, "cancelled": 0}
        self._queue: queue.SimpleQueue[_Request | None] = queue.SimpleQueue()
        self._closed = threading.Event()
        self._worker = threading.Thread(target=self._run, name="ptuning-v2-engine", daemon=True)
        self._worker.start()

    @classmethod
    def load(
        cls,
        model: str,
        prefixes: dict[str, str],
        quantization_bit: str | int | None = None,
        max_batch_size: int = 16,
        batch_wait_ms: float = 10.0,
        device: str | None = None,
    ) -> Engine:
        """Load the backbone once and every prefix checkpoint; a checkpoint that does not fit fails here.

        ``device``: where an unquantised backbone runs; None picks the GPU when there is one (a quantised one
        stays where bitsandbytes put it).
        """
        tokenizer = load_tokenizer(model)
        # A LoRA or full fine-tuning checkpoint changes the backbone itself: served alone, as the backbone.
        weight_changing = {n: p for n, p in prefixes.items() if not _is_prefix_like(p)}
        backbone_checkpoint = None
        if weight_changing:
            if len(prefixes) > 1:
                names = ", ".join(f"{n} ({checkpoint_method(p)})" for n, p in weight_changing.items())
                raise ValueError(
                    f"{names}: a checkpoint that changes the backbone's weights cannot share a backbone with other "
                    "checkpoints; serve it alone"
                )
            (checkpoint_name, backbone_checkpoint), prefixes = next(iter(weight_changing.items())), {}
        backbone = load_model(
            model, backbone_checkpoint, quantization_bit
        )  # the engine places prefixes itself
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if quantization_config(quantization_bit, torch.float32) is None:
            backbone.to(device)
        kv_shape = kv_shape_from_config(backbone.config)
        dtype = backbone.get_input_embeddings().weight.dtype
        device = backbone.get_input_embeddings().weight.device
        tables = {
            name: load_prefix_table(name, path, kv_shape, dtype, device, backbone)
            for name, path in prefixes.items()
        }
        name = checkpoint_name if backbone_checkpoint else Path(model).name or str(model)
        return cls(backbone, tokenizer, tables, name, max_batch_size, batch_wait_ms)

    # ------------------------------------------------------------------------------------------ public

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt for the assistant's next turn, whole; ValueError naming a bad message."""
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
        clean = [{"role": m["role"], "content": m["content"]} for m in messages]
        try:
            return generation_prompt_ids(clean, self.tokenizer, max_source_length=_NO_TRUNCATION)
        except TemplateError as err:  # the chat template refused the conversation (e.g. a role it lacks)
            raise ValueError(f"the chat template refused these messages: {err}") from err

    def resolve_prefix(self, prefix: str | None) -> PrefixTable | None:
        """None, "" or the backbone's name: no prefix; else a loaded prefix's name."""
        if prefix in (None, "", self.model_name):
            return None
        if prefix not in self.prefixes:
            known = [self.model_name, *self.prefix_names]
            raise ValueError(f"unknown prefix {prefix!r}; loaded: {known}")
        return self.prefixes[prefix]

    def submit(
        self,
        prompt_ids: list[int],
        prefix: str | None,
        params: SamplingParams,
        cancel: threading.Event | None = None,
        loop: Any = None,
    ) -> Generation:
        """Queue a tokenized prompt. Everything is checked here, before anything runs (ValueError).

        ``params.max_new_tokens`` is capped by the context: a reply that reaches its end finishes with "length"
        (the API server refuses such a request instead, as OpenAI's does).
        """
        table = self.resolve_prefix(prefix)
        params.check()
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        if len(prompt_ids) >= self.context_length:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens; this model's context is {self.context_length} "
                "tokens (prompt + new tokens)"
            )
        if self._closed.is_set():
            raise RuntimeError("the engine is closed")
        cancel = cancel or threading.Event()
        channel = _Channel(loop)
        generator = None
        if params.do_sample and params.temperature > 0:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            generator = torch.Generator(device=self.device).manual_seed(seed)
        self._queue.put(_Request(list(prompt_ids), table, params, cancel, channel, generator))
        return Generation(len(prompt_ids), cancel, channel)

    def stream(
        self,
        messages: list[dict[str, str]],
        prefix: str | None,
        params: SamplingParams,
        cancel: threading.Event | None = None,
    ) -> Generation:
        """Text deltas as tokens are generated (an iterator; bad input raises ValueError on this call)."""
        return self.submit(self.prompt_ids(messages), prefix, params, cancel)

    def complete(
        self, messages: list[dict[str, str]], prefix: str | None, params: SamplingParams
    ) -> Completion:
        generation = self.stream(messages, prefix, params)
        text = "".join(generation)
        return Completion(
            text,
            generation.prompt_tokens,
            generation.completion_tokens,
            generation.finish_reason,
            generation.token_ids,
        )

    def close(self) -> None:
        """Stop the worker; requests still queued or running end as cancelled."""
        self._closed.set()
        self._queue.put(None)
        self._worker.join(timeout=60)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ worker

    def _run(self) -> None:
        batch: _Batch | None = None
        while True:
            new = self._take(block=batch is None, room=self.max_batch_size - (batch.size if batch else 0))
            if self._closed.is_set():
                for request in new + (batch.rows if batch else []):
                    request.out.finish("cancelled", request.tokens)
                self._drain()
                return
            live = [r for r in new if not self._finish_if_cancelled(r)]
            try:
                with torch.inference_mode():
                    if live:
                        batch = _Batch.merge(batch, self._prefill(live))
                    if batch is not None:
                        batch = self._step(batch)
                self.stats["running"] = batch.size if batch else 0
            # An error in one batch (out of memory...) fails the requests in it, not the engine.
            except Exception as err:
                for request in live + (batch.rows if batch else []):
                    if request.out.finish_reason is None:
                        request.out.fail(RuntimeError(f"generation failed: {type(err).__name__}: {err}"))
                batch = None
                self.stats["running"] = 0

    def _take(self, block: bool, room: int) -> list[_Request]:
        """Requests waiting now (up to ``room``); when idle, block for the first and wait ``batch_wait`` for more."""
        taken: list[_Request] = []
        deadline = None
        while len(taken) < room:
            try:
                if block and not taken:
                    item = self._queue.get()
                    deadline = time.monotonic() + self.batch_wait
                elif deadline is not None:
                    item = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                else:
                    item = self._queue.get_nowait()
            except queue.Empty:
                break
            if item is None:  # close()
                self._closed.set()
                break
            taken.append(item)
        return taken

    def _drain(self) -> None:
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                return
            if item is not None:
                item.out.finish("cancelled", [])

    def _finish_if_cancelled(self, request: _Request) -> bool:
        if request.cancel.is_set():
            self._finish(request, "cancelled")
            return True
        return False

    def _forward(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        kwargs = {self._cache_argument: cache, "use_cache": True}
        if self._keep_last:
            kwargs["logits_to_keep"] = 1
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )
        assert output_cache(out) is cache  # the cache grew in place; the batch keeps using it
        return out.logits[:, -1, :].float()

    def _prefill(self, requests: list[_Request]) -> _Batch:
        """Run the prompts of newly arrived requests, each row behind its own prefix, and pick first tokens."""
        device, width = self.device, max(len(r.ids) for r in requests)
        prefix_width = max((r.prefix.length for r in requests if r.prefix), default=0)
        ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        real = torch.zeros(len(requests), width, dtype=torch.long)
        prefix_mask = torch.zeros(len(requests), prefix_width, dtype=torch.long)
        offsets = torch.zeros(len(requests), 1, dtype=torch.long)  # where a row's positions start
        for row, request in enumerate(requests):
            ids[row, width - len(request.ids) :] = torch.tensor(request.ids)
            real[row, width - len(request.ids) :] = 1
            if request.prefix is not None:
                prefix_mask[row, prefix_width - request.prefix.length :] = 1
                if request.prefix.position_convention == "peft":
                    offsets[row] = request.prefix.length
        positions = (real.cumsum(-1) - 1).clamp(min=0) + offsets
        cache = self._prefix_cache(requests, prefix_width)
        mask = torch.cat([prefix_mask, real], dim=1).to(device)
        logits = self._forward(ids.to(device), mask, positions.to(device), cache)
        self.stats["prefills"] += 1
        batch = _Batch(list(requests), cache, mask, positions[:, -1:].to(device) + 1)
        batch.next_tokens = self._sample(logits, batch.rows)
        return batch

    def _prefix_cache(self, requests: list[_Request], prefix_width: int) -> DynamicCache:
        if prefix_width == 0:
            return DynamicCache(config=self.model.config)
        layers = []
        sample = next(r.prefix for r in requests if r.prefix)
        for layer in range(len(sample.keys)):
            heads, _, head_dim = sample.keys[layer].shape
            shape = (len(requests), heads, prefix_width, head_dim)
            keys = torch.zeros(shape, dtype=sample.keys[layer].dtype, device=self.device)
            values = torch.zeros_like(keys)
            for row, request in enumerate(requests):
                if request.prefix is not None:
                    keys[row, :, prefix_width - request.prefix.length :] = request.prefix.keys[layer]
                    values[row, :, prefix_width - request.prefix.length :] = request.prefix.values[layer]
            layers.append((keys, values))
        return DynamicCache(ddp_cache_data=layers, config=self.model.config)

    def _step(self, batch: _Batch) -> _Batch | None:
        """Hand each row its new token, drop the rows that finished, and compute the next tokens."""
        keep = [
            row
            for row, request in enumerate(batch.rows)
            if not self._advance(request, batch.next_tokens[row])
        ]
        if not keep:
            return None
        if len(keep) < batch.size:
            batch.select(keep)
        tokens = torch.tensor(batch.next_tokens, device=self.device).unsqueeze(1)
        batch.mask = torch.cat([batch.mask, torch.ones_like(batch.mask[:, :1])], dim=1)
        logits = self._forward(tokens, batch.mask, batch.positions, batch.cache)
        self.stats["steps"] += 1
        self.stats["max_rows"] = max(self.stats["max_rows"], batch.size)
        batch.positions = batch.positions + 1
        batch.next_tokens = self._sample(logits, batch.rows)
        return batch

    def _sample(self, logits: torch.Tensor, rows: list[_Request]) -> list[int]:
        """Greedy rows by argmax; sampling rows with temperature, top_p and their own generator."""
        chosen = logits.argmax(dim=-1).tolist()
        for row, request in enumerate(rows):
            if request.generator is None:
                continue
            scores = logits[row] / request.params.temperature
            probs = torch.softmax(_top_p(scores, request.params.top_p), dim=-1)
            chosen[row] = int(torch.multinomial(probs, 1, generator=request.generator))
        return chosen

    def _advance(self, request: _Request, token: int) -> bool:
        """Take one generated token; emit what text is final; True when the request is done."""
        if request.cancel.is_set():
            return self._finish(request, "cancelled")
        if token in self.stop_ids:
            return self._finish(request, "stop")
        request.tokens.append(token)
        text = self.tokenizer.decode(request.tokens, skip_special_tokens=True).lstrip()
        cut = _first_stop(text, request.params.stop)
        if cut is not None:
            return self._finish(request, "stop", text[:cut])
        if len(request.tokens) >= min(request.params.max_new_tokens, self.context_length - len(request.ids)):
            return self._finish(request, "length", text)
        self._emit(request, text[: _safe_end(text, request.params.stop)])
        return False

    def _emit(self, request: _Request, text: str) -> None:
        if len(text) > request.sent:
            request.out.put(text[request.sent :])
            request.sent = len(text)

    def _finish(self, request: _Request, reason: str, text: str | None = None) -> bool:
        if text is None:
            text = self.tokenizer.decode(request.tokens, skip_special_tokens=True).lstrip()
            cut = _first_stop(text, request.params.stop)
            text = text if cut is None else text[:cut]
        self._emit(request, text.rstrip())
        if reason == "cancelled":
            self.stats["cancelled"] += 1
        request.out.finish(reason, request.tokens)
        return True


@dataclass
class _Batch:
    """The rows being decoded together: their cache, attention mask, next positions and next tokens."""

    rows: list[_Request]
    cache: DynamicCache
    mask: torch.Tensor  # (B, cache length): 0 for unused prefix slots and left padding
    positions: torch.Tensor  # (B, 1): the position of each row's next token
    next_tokens: list[int] = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.rows)

    def select(self, keep: list[int]) -> None:
        """Keep only these rows, and drop cache columns that are now masked in every row."""
        index = torch.tensor(keep, device=self.mask.device)
        self.rows = [self.rows[i] for i in keep]
        self.mask = self.mask.index_select(0, index)
        self.positions = self.positions.index_select(0, index)
        self.next_tokens = [self.next_tokens[i] for i in keep]
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        layers = [
            (
                layer.keys.index_select(0, index)[:, :, start:],
                layer.values.index_select(0, index)[:, :, start:],
            )
            for layer in self.cache.layers
        ]
        self.mask = self.mask[:, start:]
        self.cache = DynamicCache(ddp_cache_data=layers)

    @staticmethod
    def merge(old: _Batch | None, new: _Batch) -> _Batch:
        """One batch of both: the shorter cache is padded on the left (masked), then rows are stacked."""
        if old is None:
            return new
        length = max(old.mask.shape[1], new.mask.shape[1])
        layers = [
            (
                torch.cat([_left_pad(a.keys, length), _left_pad(b.keys, length)]),
                torch.cat([_left_pad(a.values, length), _left_pad(b.values, length)]),
            )
            for a, b in zip(old.cache.layers, new.cache.layers)
        ]
        mask = torch.cat([_left_pad(old.mask, length), _left_pad(new.mask, length)])
        return _Batch(
            old.rows + new.rows,
            DynamicCache(ddp_cache_data=layers),
            mask,
            torch.cat([old.positions, new.positions]),
            old.next_tokens + new.next_tokens,
        )


# --------------------------------------------------------------------------------------------------- helpers


def _left_pad(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Pad the sequence dimension (last for masks, third for cache tensors) with zeros on the left."""
    dim = 1 if tensor.dim() == 2 else 2
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _top_p(scores: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep the smallest set of tokens whose probabilities add up to ``top_p`` (always at least one)."""
    if top_p >= 1.0:
        return scores
    sorted_scores, order = torch.sort(scores, descending=False)
    cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
    remove = cumulative <= (1 - top_p)
    remove[-1] = False
    return scores.masked_fill(remove.scatter(0, order, remove), float("-inf"))


def _first_stop(text: str, stops: list[str]) -> int | None:
    """Where the earliest stop string starts in ``text``, or None."""
    found = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(found) if found else None


def _safe_end(text: str, stops: list[str]) -> int:
    """How much of ``text`` cannot change any more and can be sent.

    Held back: an unfinished multi-byte character (the decoder shows it as U+FFFD until its last byte arrives),
    trailing whitespace (stripped if the answer ends there), and a tail that may be the start of a stop string.
    """
    end = len(text.rstrip("\ufffd").rstrip())
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                end = min(end, len(text) - size)
                break
    return end


def _forward_parameters(model: nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def _context_length(model: nn.Module, tokenizer: Any) -> int:
    """The most tokens (prompt + new) a request may span: the model's position range."""
    config = (
        model.config.get_text_config(decoder=True)
        if hasattr(model.config, "get_text_config")
        else model.config
    )
    for name in ("max_position_embeddings", "seq_length", "n_positions", "max_sequence_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    return limit if isinstance(limit, int) and 0 < limit < 1_000_000 else 2048
