"""Per row of a batch: its next token (greedy, or sampled with its own settings and generator), and what its
tokens so far say as text: the part that may be sent, and whether the row has ended (stop token, stop string,
token budget, cancelled)."""

from __future__ import annotations

from typing import Any

import torch

from .requests import Request, SamplingParams, TokenLogprob


def next_tokens(logits: torch.Tensor, rows: list[Request]) -> list[int]:
    """Greedy rows by argmax; sampling rows with temperature, top_p and their own generator; bias and penalties
    first where a row asks for them. A row that asks for log-probabilities gets them (of the model's own
    distribution) in ``pending``, for the Detokenizer to keep if the token is kept."""
    chosen = logits.argmax(dim=-1).tolist()
    for row, request in enumerate(rows):
        params = request.params
        scores = logits[row]
        if params.adjusts_logits:
            scores = adjusted_logits(scores, params, request.ids, request.tokens)
            chosen[row] = int(scores.argmax())
        if request.generator is not None:
            probs = torch.softmax(_top_p(scores / params.temperature, params.top_p), dim=-1)
            chosen[row] = int(torch.multinomial(probs, 1, generator=request.generator))
        if params.logprobs is not None:
            request.pending = token_logprob(
                torch.log_softmax(logits[row], dim=-1), chosen[row], params.logprobs
            )
    return chosen


def adjusted_logits(
    scores: torch.Tensor, params: SamplingParams, prompt: list[int], answer: list[int]
) -> torch.Tensor:
    """One row's logits after ``logit_bias``, ``repetition_penalty`` (prompt and answer tokens) and OpenAI's
    ``frequency_penalty`` / ``presence_penalty`` (answer tokens)."""
    scores = scores.clone()
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), device=scores.device)
        scores[ids] += torch.tensor(
            list(params.logit_bias.values()), device=scores.device, dtype=scores.dtype
        )
    if params.repetition_penalty != 1.0:
        seen = torch.tensor(sorted(set(prompt) | set(answer)), device=scores.device, dtype=torch.long)
        picked = scores[seen]
        penalty = params.repetition_penalty
        scores[seen] = torch.where(picked > 0, picked / penalty, picked * penalty)
    if answer and (params.frequency_penalty or params.presence_penalty):
        counts = torch.bincount(torch.tensor(answer, device=scores.device), minlength=scores.shape[-1])
        counts = counts[: scores.shape[-1]].to(scores.dtype)
        scores -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(scores.dtype)
    return scores


def token_logprob(logprobs: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """``token``'s entry in one position's log-probabilities, with the ``top`` likeliest alternatives."""
    alternatives: list[tuple[int, float]] = []
    if top:
        values, ids = logprobs.topk(min(top, logprobs.shape[-1]))
        alternatives = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logprobs[token]), alternatives)


class Detokenizer:
    """Turns each row's tokens into the text deltas its caller reads, and ends the row when it is done.

    ``stats`` is the engine's own counter dict: a cancelled request is counted there, where /health reads it.
    """

    def __init__(
        self, tokenizer: Any, stop_ids: list[int], context_length: int, stats: dict[str, int]
    ) -> None:
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.context_length = context_length
        self.stats = stats

    def advance(self, request: Request, token: int) -> bool:
        """Take one generated token; emit what text is final; True when the request is done."""
        if request.cancel.is_set():
            return self.finish(request, "cancelled")
        if token in self.stop_ids:
            return self.finish(request, "stop")
        request.tokens.append(token)
        if request.pending is not None:
            request.out.logprobs.append(request.pending)
            request.pending = None
        text = self.tokenizer.decode(request.tokens, skip_special_tokens=True).lstrip()
        cut = _first_stop(text, request.params.stop)
        if cut is not None:
            return self.finish(request, "stop", text[:cut])
        if len(request.tokens) >= min(request.params.max_new_tokens, self.context_length - len(request.ids)):
            return self.finish(request, "length", text)
        self._emit(request, text[: safe_end(text, request.params.stop)])
        return False

    def finish(self, request: Request, reason: str, text: str | None = None) -> bool:
        """Send the rest of the answer and end the request with ``reason``; True, for ``advance``'s callers."""
        if text is None:
            text = self.tokenizer.decode(request.tokens, skip_special_tokens=True).lstrip()
            cut = _first_stop(text, request.params.stop)
            text = text if cut is None else text[:cut]
        self._emit(request, text.rstrip())
        if reason == "cancelled":
            self.stats["cancelled"] += 1
        request.out.finish(reason, request.tokens)
        return True

    def _emit(self, request: Request, text: str) -> None:
        if len(text) > request.sent:
            request.out.put(text[request.sent :])
            request.sent = len(text)


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


def safe_end(text: str, stops: list[str]) -> int:
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
