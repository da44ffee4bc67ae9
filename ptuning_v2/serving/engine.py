"""Conversation -> prompt ids -> generated text, streamed, for many prefixes on one frozen backbone.

A prefix is only a key/value table placed in front of the cache, so the engine keeps one bare backbone and, per
prefix, the table it computes (once, at load: eval mode, so no dropout; a projection MLP is run once and
dropped; see ``tables``). Requests from any thread go into a queue; one worker thread batches whatever is
waiting, requests for different prefixes and for none in the same batch, and decodes one token per step for all
of them. How a batch's cache holds rows with different prefixes is ``batch``'s; each row has its own sampling
(temperature, top_p, its own seeded ``torch.Generator``), stop tokens, stop strings and token budget
(``sampling``); a row that finishes or is cancelled leaves the batch at once, and requests that arrive meanwhile
join it after their own prefill.
"""

from __future__ import annotations

import secrets
import threading
from functools import partial
from pathlib import Path
from typing import Any

import torch
from jinja2 import TemplateError
from torch import nn

from ..checkpoint import CheckpointRecord
from ..compat import cache_argument, output_cache
from ..data import generation_prompt_ids
from ..generation import stop_token_ids
from ..loading import load_model, load_tokenizer, quantization_config
from ..methods import METHODS, read_checkpoint
from .batch import Batch
from .requests import (
    Channel,
    Completion,
    Generation,
    Request,
    RequestQueue,
    SamplingParams,
    TokenLogprob,
    check_messages,
)
from .sampling import Detokenizer, next_tokens, token_logprob
from .tables import PrefixTable, load_prefix_table

# The names other modules import from here, wherever they are defined now.
__all__ = ["Completion", "Engine", "Generation", "PrefixTable", "SamplingParams", "TokenLogprob"]

# generation_prompt_ids cuts long prompts to this many tokens; the engine wants them whole so that a prompt too
# long for the context is refused, not silently shortened.
_NO_TRUNCATION = 1 << 40


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
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self._cache_argument = cache_argument(model)
        self._keep_last = "logits_to_keep" in _forward_parameters(model)
        # For tests, benchmarks and /health: prefill forwards, decoding steps, the most rows decoded together,
        # the rows being decoded now, requests cancelled.
        self.stats = {"prefills": 0, "steps": 0, "max_rows": 0, "running": 0, "cancelled": 0}
        self._text = Detokenizer(tokenizer, self.stop_ids, self.context_length, self.stats)
        self._requests = RequestQueue()
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
        records = {name: read_checkpoint(path) for name, path in prefixes.items()}  # each read once, here
        checkpoint_name, backbone_checkpoint = _backbone_checkpoint(records)
        if backbone_checkpoint:
            records = {}
        backbone = load_model(
            model, backbone_checkpoint, quantization_bit
        )  # the engine places prefixes itself
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        if quantization_config(quantization_bit, torch.float32) is None:
            backbone.to(device)
        dtype = backbone.get_input_embeddings().weight.dtype
        device = backbone.get_input_embeddings().weight.device
        tables = {
            name: load_prefix_table(name, record, dtype, device, backbone) for name, record in records.items()
        }
        name = checkpoint_name if backbone_checkpoint else Path(model).name or str(model)
        return cls(backbone, tokenizer, tables, name, max_batch_size, batch_wait_ms)

    # ------------------------------------------------------------------------------------------ public

    def resolve_prefix(self, prefix: str | PrefixTable | None) -> PrefixTable | None:
        """What a request's model name means, decided here only: None, "" or the backbone's name is no prefix;
        else a loaded prefix's name (ValueError listing the loaded ones). A resolved table passes as it is."""
        if isinstance(prefix, PrefixTable):
            return prefix
        if prefix in (None, "", self.model_name):
            return None
        if prefix not in self.prefixes:
            known = [self.model_name, *self.prefix_names]
            raise ValueError(f"unknown prefix {prefix!r}; loaded: {known}")
        return self.prefixes[prefix]

    def prompt_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The prompt for the assistant's next turn, whole; ValueError naming a bad message."""
        clean = check_messages(messages)
        try:
            return generation_prompt_ids(clean, self.tokenizer, max_source_length=_NO_TRUNCATION)
        except TemplateError as err:  # the chat template refused the conversation (e.g. a role it lacks)
            raise ValueError(f"the chat template refused these messages: {err}") from err

    def submit(
        self,
        prompt_ids: list[int],
        prefix: str | PrefixTable | None,
        params: SamplingParams,
        cancel: threading.Event | None = None,
        loop: Any = None,
    ) -> Generation:
        """Queue a tokenized prompt. Everything is checked here, before anything runs (ValueError).

        ``params.max_new_tokens is capped by the context: a reply that reaches its end finishes with "length"
        (the API server refuses such a request instead, as OpenAI's does).
        """
        table = self.resolve_prefix(prefix)
        params.check()
        if not prompt_ids:
            raise ValueError("the prompt is empty")
        outside = [t for t in [*prompt_ids, *params.logit_bias] if not 0 <= t < self.vocab_size]
        if outside:
            raise ValueError(
                f"token id {outside[0]} is outside this model's vocabulary (0..{self.vocab_size - 1})"
            )
        if len(prompt_ids) >= self.context_length:
            raise ValueError(
                f"the prompt has {len(prompt_ids)} tokens; this model's context is {self.context_length} "
                "tokens (prompt + new tokens)"
            )
        if self._requests.closed.is_set():
            raise RuntimeError("the engine is closed")
        cancel = cancel or threading.Event()
        channel = Channel(loop)
        generator = None
        if params.do_sample and params.temperature > 0:
            seed = params.seed if params.seed is not None else secrets.randbits(63)
            generator = torch.Generator(device=self.device).manual_seed(seed)
        self._requests.put(Request(list(prompt_ids), table, params, cancel, channel, generator))
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
            generation.logprobs,
        )

    def close(self) -> None:
        """Stop the worker; requests still queued or running end as cancelled."""
        self._requests.close()
        self._worker.join(timeout=60)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------------------------------ worker

    def _run(self) -> None:
        batch: Batch | None = None
        while True:
            room = self.max_batch_size - (batch.size if batch else 0)
            new = self._requests.take(block=batch is None, room=room, wait=self.batch_wait)
            if self._requests.closed.is_set():
                for request in new + (batch.rows if batch else []):
                    request.out.finish("cancelled", request.tokens)
                self._requests.drain()
                return
            live = [r for r in new if not self._finish_if_cancelled(r)]
            try:
                with torch.inference_mode():
                    new_batch = self._prefill(live) if live else None
                    if new_batch is not None:
                        batch = Batch.merge(batch, new_batch)
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

    def _finish_if_cancelled(self, request: Request) -> bool:
        if request.cancel.is_set():
            self._text.finish(request, "cancelled")
            return True
        return False

    def _forward(
        self, input_ids, attention_mask, position_ids, cache, every_position: bool = False
    ) -> torch.Tensor:
        """The last position's logits, or every position's (``(B, T, V)``) for scoring a prompt."""
        kwargs = {self._cache_argument: cache, "use_cache": True}
        if self._keep_last and not every_position:
            kwargs["logits_to_keep"] = 1
        out = self.model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kwargs
        )
        assert output_cache(out) is cache  # the cache grew in place; the batch keeps using it
        return out.logits.float() if every_position else out.logits[:, -1, :].float()

    def _prefill(self, requests: list[Request]) -> Batch | None:
        """Run the prompts of newly arrived requests and pick their first tokens.

        A request that scores its prompt runs alone (no padding), keeping every position's logits; one that
        asks for no new tokens ends there.
        """
        plain = [r for r in requests if r.params.prompt_logprobs is None]
        # self._forward is looked up at each call: a test may slow it down while the engine runs.
        groups = [(plain, self._forward)] if plain else []
        scoring = [r for r in requests if r.params.prompt_logprobs is not None]
        groups += [([r], partial(self._forward, every_position=True)) for r in scoring]
        batch = None
        for rows, forward in groups:
            new, logits = Batch.prefill(rows, forward, self.pad_id, self.device, self.model.config)
            self.stats["prefills"] += 1
            if logits.dim() == 3:
                rows[0].out.prompt_logprobs[:] = _prompt_logprobs(logits[0], rows[0])
                logits = logits[:, -1, :]
            new.next_tokens = next_tokens(logits, new.rows)
            if rows[0].params.max_new_tokens == 0:  # only a scoring request asks for nothing new
                self._text.finish(rows[0], "length")
                continue
            batch = Batch.merge(batch, new)
        return batch

    def _step(self, batch: Batch) -> Batch | None:
        """Hand each row its new token, drop the rows that finished, and compute the next tokens."""
        keep = [
            row
            for row, request in enumerate(batch.rows)
            if not self._text.advance(request, batch.next_tokens[row])
        ]
        if not keep:
            return None
        if len(keep) < batch.size:
            batch.select(keep)
        logits = batch.step(self._forward, self.device)
        self.stats["steps"] += 1
        self.stats["max_rows"] = max(self.stats["max_rows"], batch.size)
        batch.next_tokens = next_tokens(logits, batch.rows)
        return batch


def _prompt_logprobs(logits: torch.Tensor, request: Request) -> list[TokenLogprob | None]:
    """Each prompt token's log-probability given the tokens before it (and the prefix); none for the first."""
    logprobs = torch.log_softmax(logits[:-1], dim=-1)
    top = request.params.prompt_logprobs
    return [None] + [token_logprob(logprobs[i], token, top) for i, token in enumerate(request.ids[1:])]


def _backbone_checkpoint(
    records: dict[str, CheckpointRecord],
) -> tuple[str | None, CheckpointRecord | None]:
    """(name, record) of the checkpoint to load into the backbone, or (None, None) when all act as prefixes.

    A checkpoint that changes the backbone's weights (LoRA, full fine-tuning) is served alone, as the backbone.
    """
    weight_changing = {n: r for n, r in records.items() if not METHODS[r.method].shares_backbone}
    if not weight_changing:
        return None, None
    if len(records) > 1:
        names = ", ".join(f"{n} ({r.method})" for n, r in weight_changing.items())
        raise ValueError(
            f"{names}: a checkpoint that changes the backbone's weights cannot share a backbone with other "
            "checkpoints; serve it alone"
        )
    return next(iter(weight_changing.items()))


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
