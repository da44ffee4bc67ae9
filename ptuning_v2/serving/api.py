"""An OpenAI-compatible chat server for one backbone and many prefixes (``bash scripts/api.sh``).

    python -m ptuning_v2.serving.api --model models/glm-zh-tiny --prefixes ner=output/ner-ptuning_v2-64-1e-1

``GET /v1/models`` lists the backbone and every prefix; ``POST /v1/chat/completions`` and the legacy
``POST /v1/completions`` (raw prompts or token ids, ``echo``, ``logprobs``: what evaluation harnesses call) answer
with the prefix named by ``model`` (the backbone's name: no prefix), streamed as server-sent events with
``"stream": true``. Requests that arrive together are decoded in one batch, whatever prefix each one uses (see
``engine``). Which request fields are honoured and which are refused is ``protocol``'s.

Every bad request gets a 4xx in OpenAI's error shape, ``{"error": {"message", "type", "param", "code"}}``, and
the server goes on serving. With an API key, every request needs ``Authorization: Bearer <key>``.

Sampling: greedy unless ``temperature`` or ``top_p`` is given (``temperature: 0`` is greedy too), so that an
answer is reproducible by default; ``seed`` makes a sampled answer reproducible.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, Generation, TokenLogprob
from .protocol import (
    MAX_MESSAGES_CAP,
    APIError,
    ChatRequest,
    CommonSettings,
    CompletionRequest,
    RequestLimits,
)
from .settings import DEFAULT_MODEL, served_prefixes

API_KEY_ENV = "PTUNING_V2_API_KEY"


# ---------------------------------------------------------------------------------------------------- answers


def _usage(prompts: list[list[int]], generations: list[Generation]) -> dict[str, int]:
    prompt = sum(len(ids) for ids in prompts)  # each prompt counted once, however many answers it gets
    completion = sum(g.completion_tokens for g in generations)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


def _token_text(engine: Engine, token: int) -> str:
    return engine.tokenizer.decode([token])


def _chat_logprobs(engine: Engine, entries: list[TokenLogprob]) -> dict[str, Any]:
    """OpenAI's chat ``logprobs``: per token its text, bytes, log-probability and the top alternatives."""

    def one(token: int, logprob: float) -> dict[str, Any]:
        text = _token_text(engine, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]
    return {"content": content, "refusal": None}


def _completion_logprobs(
    engine: Engine, tokens: list[int], entries: list[TokenLogprob | None], offset: int = 0
) -> tuple[dict[str, Any], int]:
    """The legacy ``logprobs`` block (tokens, token_logprobs, top_logprobs, text_offset) of these token ids, and
    the text offset after them. An entry of None (a prompt's first token) has no log-probability, as OpenAI's.
    Offsets count the tokens' own texts."""
    out: dict[str, list[Any]] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, entry in zip(tokens, entries):
        text = _token_text(engine, token)
        out["tokens"].append(text)
        out["token_logprobs"].append(None if entry is None else entry.logprob)
        out["top_logprobs"].append(
            None if entry is None else {_token_text(engine, t): lp for t, lp in entry.top}
        )
        out["text_offset"].append(offset)
        offset += len(text)
    return out, offset


def _answer_logprobs(engine: Engine, entries: list[TokenLogprob], offset: int) -> tuple[dict[str, Any], int]:
    return _completion_logprobs(engine, [e.token for e in entries], entries, offset)


def _joined(a: dict[str, Any] | None, b: dict[str, Any]) -> dict[str, Any]:
    """Two legacy logprobs blocks as one (b's offsets already continue a's)."""
    return b if a is None else {key: a[key] + b[key] for key in a}


async def _read_body(request: Request, limits: RequestLimits) -> Any:
    """The JSON body, read no further than the limit allows (413 past it)."""
    too_large = APIError(
        413,
        f"the request body is larger than {limits.max_body_bytes} bytes, more than "
        f"MAX_REQUEST_CHARS={limits.max_chars} characters could need",
        code="request_too_large",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limits.max_body_bytes:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limits.max_body_bytes:
            raise too_large
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON ({err})") from err


def _submit(engine: Engine, prompts: list[list[int]], settings: CommonSettings) -> list[Generation]:
    """n generations per prompt, choice ``p * n + i``; all queued at once, so they are decoded in one batch."""
    loop = asyncio.get_running_loop()
    generations: list[Generation] = []
    try:
        for ids in prompts:
            for i in range(settings.n):
                generations.append(engine.submit(ids, settings.prefix, settings.choice_params(i), loop=loop))
    except ValueError as err:
        for generation in generations:
            generation.cancel()
        raise APIError(400, str(err)) from err
    return generations


async def _events(generations: list[Generation]) -> AsyncIterator[tuple[int, str | None | Exception]]:
    """(choice, delta) as the generations produce them; (choice, None) when one ends, (choice, error) if it fails.
    Leaving early (a client gone) cancels every generation."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, generation: Generation) -> None:
        try:
            async for delta in generation:
                await queue.put((index, delta))
            await queue.put((index, None))
        except RuntimeError as err:
            await queue.put((index, err))

    tasks = [asyncio.create_task(pump(i, g)) for i, g in enumerate(generations)]
    try:
        ended = 0
        while ended < len(generations):
            index, item = await queue.get()
            ended += not isinstance(item, str)
            yield index, item
    finally:
        for task in tasks:
            task.cancel()
        for generation in generations:
            generation.cancel()  # a no-op once finished; frees the batch slot of a client that went away


async def _texts(request: Request, generations: list[Generation]) -> list[str]:
    """Every generation's whole text; a client that goes away meanwhile cancels them."""
    texts = [""] * len(generations)
    events = _events(generations)
    watcher = asyncio.create_task(_cancel_on_disconnect(request, generations))
    try:
        async for index, item in events:
            if isinstance(item, Exception):
                raise APIError(500, str(item), type="server_error")
            texts[index] += item or ""
    finally:
        await events.aclose()
        watcher.cancel()
    return texts


async def _cancel_on_disconnect(request: Request, generations: list[Generation]) -> None:
    """Poll for the client going away during a non-streamed answer, and free its batch slots if it does."""
    while any(g.finish_reason is None for g in generations):
        if await request.is_disconnected():
            for generation in generations:
                generation.cancel()
            return
        await asyncio.sleep(0.1)


def _streaming(events: AsyncIterator[str]) -> StreamingResponse:
    return StreamingResponse(
        events,
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


# ---------------------------------------------------------------------------------------------------- the app


def create_app(engine: Engine, api_key: str | None = None, limits: RequestLimits | None = None) -> FastAPI:
    limits = limits or RequestLimits.for_engine(engine)

    async def require_api_key(request: Request) -> None:
        if not api_key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            why = "No API key provided" if not header else "Incorrect API key provided"
            raise APIError(401, f"{why}; send 'Authorization: Bearer <API_KEY>'", None, "invalid_api_key")

    app = FastAPI(
        title="ptuning_v2 OpenAI-compatible API",
        docs_url=None,
        redoc_url=None,
        openapi_url=None,
        dependencies=[Depends(require_api_key)],
    )
    created = int(time.time())

    @app.exception_handler(APIError)
    async def api_error(_: Request, err: APIError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if err.status == 401 else None
        return JSONResponse(err.body(), status_code=err.status, headers=headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return await api_error(request, APIError(err.status_code, str(err.detail), type=kind))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        return await api_error(request, APIError(400, str(err)))

    def model_card(name: str) -> dict[str, Any]:
        return {"id": name, "object": "model", "created": created, "owned_by": "ptuning_v2"}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [model_card(n) for n in [engine.model_name, *engine.prefix_names]]}

    @app.get("/v1/models/{name}")
    async def get_model(name: str) -> dict[str, Any]:
        try:
            engine.resolve_prefix(name)
        except ValueError:
            raise APIError(404, f"The model '{name}' does not exist", "model", "model_not_found") from None
        return model_card(name)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", **engine.stats}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _read_body(request, limits)
        # Rendering and tokenizing run off the event loop, so a long conversation does not stall other streams.
        chat = await run_in_threadpool(ChatRequest, engine, body, limits)
        generations = _submit(engine, [chat.prompt_ids], chat.settings)
        reply = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "created": int(time.time()),
            "model": chat.settings.model,
        }
        logprobs = chat.settings.params.logprobs is not None
        if chat.settings.stream:
            return _streaming(_chat_stream(engine, generations, chat, reply))
        texts = await _texts(request, generations)
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": text},
                "logprobs": _chat_logprobs(engine, g.logprobs) if logprobs else None,
                "finish_reason": g.finish_reason,
            }
            for i, (g, text) in enumerate(zip(generations, texts))
        ]
        usage = _usage([chat.prompt_ids], generations)
        return {
            **reply,
            "object": "chat.completion",
            "choices": choices,
            "usage": usage,
            "system_fingerprint": None,
        }

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _read_body(request, limits)
        job = await run_in_threadpool(CompletionRequest, engine, body, limits)
        generations = _submit(engine, job.prompt_ids, job.settings)
        reply = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": job.settings.model}
        if job.settings.stream:
            return _streaming(_completion_stream(engine, generations, job, reply))
        texts = await _texts(request, generations)
        choices = []
        for i, (generation, text) in enumerate(zip(generations, texts)):
            head, logprobs, offset = _echo(engine, job, i, generation)
            if job.settings.params.logprobs is not None:
                answer, _ = _answer_logprobs(engine, generation.logprobs, offset)
                logprobs = _joined(logprobs, answer)
            choices.append(
                {
                    "index": i,
                    "text": head + text,
                    "logprobs": logprobs,
                    "finish_reason": generation.finish_reason,
                }
            )
        usage = _usage(job.prompt_ids, generations)
        return {
            **reply,
            "object": "text_completion",
            "choices": choices,
            "usage": usage,
            "system_fingerprint": None,
        }

    return app


def _echo(
    engine: Engine, job: CompletionRequest, choice: int, generation: Generation
) -> tuple[str, dict[str, Any] | None, int]:
    """What an echoing choice starts with: its prompt's text, with logprobs the prompt tokens' logprobs, and the
    text offset the answer's logprobs continue from."""
    if not job.echo:
        return "", None, 0
    prompt = choice // job.settings.n
    if job.settings.params.logprobs is None:
        return job.prompt_texts[prompt], None, 0
    block, offset = _completion_logprobs(engine, job.prompt_ids[prompt], generation.prompt_logprobs)
    return job.prompt_texts[prompt], block, offset


async def _chat_stream(
    engine: Engine, generations: list[Generation], chat: ChatRequest, reply: dict[str, Any]
) -> AsyncIterator[str]:
    """``chat.completion.chunk`` events; a client that disconnects cancels this generator, and so the request."""
    base = {**reply, "object": "chat.completion.chunk"}
    logprobs = chat.settings.params.logprobs is not None
    sent = [0] * len(generations)  # logprob entries already sent, per choice

    def chunk(index: int, delta: dict[str, Any], finish_reason: str | None = None) -> str:
        entries = None
        if logprobs:
            new = generations[index].logprobs[sent[index] :]
            sent[index] += len(new)
            entries = _chat_logprobs(engine, new)
        choice = {"index": index, "delta": delta, "logprobs": entries, "finish_reason": finish_reason}
        return _sse({**base, "choices": [choice]})

    for index in range(len(generations)):
        yield _sse(
            {
                **base,
                "choices": [
                    {
                        "index": index,
                        "delta": {"role": "assistant", "content": ""},
                        "logprobs": None,
                        "finish_reason": None,
                    }
                ],
            }
        )
    events = _events(generations)
    try:
        async for index, item in events:
            if isinstance(item, Exception):  # the batch failed: tell the client in the stream, as OpenAI does
                yield _sse(APIError(500, str(item), type="server_error").body())
                break
            yield (
                chunk(index, {"content": item})
                if item is not None
                else chunk(index, {}, generations[index].finish_reason)
            )
        else:
            if chat.settings.include_usage:
                yield _sse({**base, "choices": [], "usage": _usage([chat.prompt_ids], generations)})
    finally:
        await (
            events.aclose()
        )  # a client gone mid-stream: its generations are cancelled now, not at collection
    yield _sse("[DONE]")


async def _completion_stream(
    engine: Engine, generations: list[Generation], job: CompletionRequest, reply: dict[str, Any]
) -> AsyncIterator[str]:
    """``text_completion`` events: the echoed prompt first (per choice), then the answer's deltas."""
    base = {**reply, "object": "text_completion"}
    logprobs = job.settings.params.logprobs is not None
    sent = [0] * len(generations)
    offsets = [0] * len(generations)
    echoed = [False] * len(generations)

    def chunk(index: int, text: str, finish_reason: str | None = None) -> str:
        entries = None
        if not echoed[index]:  # the prompt's logprobs are there from the prefill on
            echoed[index] = True
            head, entries, offsets[index] = _echo(engine, job, index, generations[index])
            text = head + text
        if logprobs:
            new = generations[index].logprobs[sent[index] :]
            sent[index] += len(new)
            block, offsets[index] = _answer_logprobs(engine, new, offsets[index])
            entries = block if entries is None else _joined(entries, block)
        choice = {"index": index, "text": text, "logprobs": entries, "finish_reason": finish_reason}
        return _sse({**base, "choices": [choice]})

    events = _events(generations)
    try:
        async for index, item in events:
            if isinstance(item, Exception):
                yield _sse(APIError(500, str(item), type="server_error").body())
                break
            yield (
                chunk(index, item) if item is not None else chunk(index, "", generations[index].finish_reason)
            )
        else:
            if job.settings.include_usage:
                yield _sse({**base, "choices": [], "usage": _usage(job.prompt_ids, generations)})
    finally:
        await events.aclose()
    yield _sse("[DONE]")


# ------------------------------------------------------------------------------------------------ command line


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--quantization_bit", default=None, help="4, 8 or none")
    parser.add_argument(
        "--prefixes",
        default=None,
        help="NAME=PATH[,NAME=PATH...] prefix checkpoints (ours, official ChatGLM, PEFT); "
        "default: the main job's prefix when it exists",
    )
    parser.add_argument("--max_batch_size", type=int, default=16)
    parser.add_argument("--batch_wait_ms", type=float, default=10.0)
    parser.add_argument(
        "--max_request_messages",
        type=int,
        default=None,
        help=f"messages (or prompts) per request; default: what fits the context, at most {MAX_MESSAGES_CAP}",
    )
    parser.add_argument(
        "--max_request_chars",
        type=int,
        default=None,
        help="characters per request; default: the context times the tokenizer's longest token",
    )
    parser.add_argument("--log_level", default="info")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = parse_args(argv)
    prefixes = served_prefixes(args.prefixes, args.model)
    # The key comes from the environment, not argv, so it does not show in the process list.
    api_key = os.environ.get(API_KEY_ENV) or None
    engine = Engine.load(args.model, prefixes, args.quantization_bit, args.max_batch_size, args.batch_wait_ms)
    limits = RequestLimits.for_engine(engine, args.max_request_messages, args.max_request_chars)
    served = ", ".join(f"{name} ({engine.prefixes[name].path})" for name in engine.prefix_names) or "none"
    print(
        f"serving {engine.model_name} with prefixes: {served}; http://{args.host}:{args.port}/v1"
        + (" (API key required)" if api_key else "")
        + f"; at most {limits.max_messages} messages and {limits.max_chars} characters per request",
        flush=True,
    )
    try:
        uvicorn.run(
            create_app(engine, api_key, limits), host=args.host, port=args.port, log_level=args.log_level
        )
    finally:
        engine.close()


if __name__ == "__main__":
    try:
        main()
    except (
        ValueError,
        OSError,
    ) as err:  # a prefix that does not fit, a missing model: one line, not a traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
