"""An OpenAI-compatible chat server for one backbone and many prefixes (``bash scripts/api.sh``).

    python -m ptuning_v2.serving.api --model models/glm-zh-tiny --prefixes ner=output/ner-ptuning_v2-64-1e-1

``GET /v1/models`` lists the backbone and every prefix; ``POST /v1/chat/completions`` answers with the prefix
named by ``model`` (the backbone's name: no prefix), streamed as server-sent events with ``"stream": true``.
Requests that arrive together are decoded in one batch, whatever prefix each one uses (see ``engine``).

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
from starlette.exceptions import HTTPException as StarletteHTTPException

from .engine import Engine, Generation, SamplingParams
from .settings import DEFAULT_MODEL, default_prefixes, parse_prefixes

API_KEY_ENV = "PTUNING_V2_API_KEY"
MAX_STOP_STRINGS = 4  # as OpenAI


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

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


# ------------------------------------------------------------------------------------------ request parsing


def _number(
    body: dict[str, Any], name: str, low: float, high: float, low_inclusive: bool = True
) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(400, f"'{name}' must be a number, got {json.dumps(value)}", name)
    if not ((value >= low if low_inclusive else value > low) and value <= high):
        bracket = "[" if low_inclusive else "("
        raise APIError(400, f"'{name}' must be in {bracket}{low}, {high}], got {value}", name)
    return float(value)


def _integer(body: dict[str, Any], name: str) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"'{name}' must be an integer, got {json.dumps(value)}", name)
    return value


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    """OpenAI messages -> ``{role, content}`` with text content (text parts of a content list are joined)."""
    if "messages" not in body:
        raise APIError(400, "'messages' is a required property", "messages")
    messages = body["messages"]
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "'messages' must be a non-empty array of {role, content} objects", "messages")
    plain = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise APIError(400, f"messages[{i}] must be an object with role and content", f"messages[{i}]")
        content = message.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in content
            ):
                raise APIError(
                    400, f"messages[{i}].content: only text parts are supported", f"messages[{i}].content"
                )
            content = "".join(part["text"] for part in content)
        elif content is None and message.get("role") == "assistant":
            content = ""
        plain.append({"role": message.get("role"), "content": content})
    return plain


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


class ChatRequest:
    """A checked ``/v1/chat/completions`` body: the prompt ids, the prefix and the sampling settings."""

    def __init__(self, engine: Engine, body: Any) -> None:
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise APIError(400, "'model' is a required property (a string)", "model")
        try:
            self.prefix = engine.resolve_prefix(model)  # the request's model, resolved once: a table or none
        except ValueError:
            known = ", ".join([engine.model_name, *engine.prefix_names])
            raise APIError(
                404, f"The model '{model}' does not exist; loaded: {known}", "model", "model_not_found"
            ) from None
        self.model = model
        if (body.get("n") or 1) != 1:
            raise APIError(400, "only n=1 is supported", "n")
        messages = _messages(body)
        try:
            self.prompt_ids = engine.prompt_ids(messages)
        except ValueError as err:
            raise APIError(400, str(err), "messages") from err
        room = engine.context_length - len(self.prompt_ids)
        if room < 1:
            raise APIError(
                400,
                f"This model's maximum context length is {engine.context_length} tokens. However, your messages "
                f"resulted in {len(self.prompt_ids)} tokens. Please reduce the length of the messages.",
                "messages",
                "context_length_exceeded",
            )
        name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = _integer(body, name)
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"'{name}' must be at least 1, got {max_tokens}", name)
        if max_tokens is not None and max_tokens > room:
            raise APIError(
                400,
                f"This model's maximum context length is {engine.context_length} tokens. However, you requested "
                f"{len(self.prompt_ids) + max_tokens} tokens ({len(self.prompt_ids)} in the messages, {max_tokens} "
                f"in the completion). Please reduce the length of the messages or completion.",
                name,
                "context_length_exceeded",
            )
        temperature = _number(body, "temperature", 0.0, 2.0)
        top_p = _number(body, "top_p", 0.0, 1.0, low_inclusive=False)
        seed = _integer(body, "seed")
        defaults = SamplingParams()
        self.params = SamplingParams(
            max_new_tokens=max_tokens or min(defaults.max_new_tokens, room),
            do_sample=(temperature is not None or top_p is not None) and temperature != 0.0,
            temperature=defaults.temperature if temperature is None else temperature,
            top_p=defaults.top_p if top_p is None else top_p,
            seed=seed,
            stop=_stop(body),
        )
        stream = body.get("stream", False)
        if not isinstance(stream, bool) and stream is not None:
            raise APIError(400, f"'stream' must be true or false, got {json.dumps(stream)}", "stream")
        self.stream = bool(stream)
        options = body.get("stream_options") or {}
        if not isinstance(options, dict):
            raise APIError(400, "'stream_options' must be an object", "stream_options")
        self.include_usage = bool(options.get("include_usage"))


# ---------------------------------------------------------------------------------------------------- the app


def _usage(generation: Generation) -> dict[str, int]:
    prompt, completion = generation.prompt_tokens, generation.completion_tokens
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _sse(payload: dict[str, Any] | str) -> str:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n"


async def _read_body(request: Request) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise APIError(400, f"the request body is not valid JSON ({err})") from err


async def _cancel_on_disconnect(request: Request, generation: Generation) -> None:
    """Poll for the client going away during a non-streamed answer, and free its batch slot if it does."""
    while generation.finish_reason is None:
        if await request.is_disconnected():
            generation.cancel()
            return
        await asyncio.sleep(0.1)


def create_app(engine: Engine, api_key: str | None = None) -> FastAPI:
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
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return APIError(err.status_code, str(err.detail), type=kind).response()

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, err: RequestValidationError) -> JSONResponse:
        return APIError(400, str(err)).response()

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
        chat = ChatRequest(engine, await _read_body(request))
        try:
            generation = engine.submit(
                chat.prompt_ids, chat.prefix, chat.params, loop=asyncio.get_running_loop()
            )
        except ValueError as err:
            raise APIError(400, str(err)) from err
        reply_id = f"chatcmpl-{uuid.uuid4().hex}"
        if chat.stream:
            return StreamingResponse(
                _stream(generation, chat, reply_id),
                media_type="text/event-stream",
                headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
            )
        watcher = asyncio.create_task(_cancel_on_disconnect(request, generation))
        try:
            text = "".join([delta async for delta in generation])
        except RuntimeError as err:
            raise APIError(500, str(err), type="server_error") from err
        finally:
            generation.cancel()  # a no-op once finished; frees the slot if this handler was cancelled
            watcher.cancel()
        return {
            "id": reply_id,
            "object": "chat.completion",
            "created": int(time.time()),
            "model": chat.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": generation.finish_reason,
                }
            ],
            "usage": _usage(generation),
            "system_fingerprint": None,
        }

    return app


async def _stream(generation: Generation, chat: ChatRequest, reply_id: str) -> AsyncIterator[str]:
    """``chat.completion.chunk`` events; a client that disconnects cancels this generator, and so the request."""
    base = {
        "id": reply_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": chat.model,
    }

    def chunk(delta: dict[str, Any], finish_reason: str | None = None) -> str:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return _sse({**base, "choices": [choice]})

    try:
        yield chunk({"role": "assistant", "content": ""})
        async for delta in generation:
            yield chunk({"content": delta})
        yield chunk({}, generation.finish_reason)
        if chat.include_usage:
            yield _sse({**base, "choices": [], "usage": _usage(generation)})
    except RuntimeError as err:  # the batch failed: tell the client in the stream, as OpenAI does
        yield _sse(APIError(500, str(err), type="server_error").body())
    finally:
        generation.cancel()  # a no-op once finished; frees the batch slot of a client that went away
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
    parser.add_argument("--log_level", default="info")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    args = parse_args(argv)
    if args.prefixes is not None:
        prefixes = parse_prefixes(args.prefixes)
    else:  # the main job trains on the embedded model; its prefix would not fit another backbone
        prefixes = default_prefixes() if args.model == DEFAULT_MODEL else {}
    # The key comes from the environment, not argv, so it does not show in the process list.
    api_key = os.environ.get(API_KEY_ENV) or None
    engine = Engine.load(args.model, prefixes, args.quantization_bit, args.max_batch_size, args.batch_wait_ms)
    served = ", ".join(f"{name} ({engine.prefixes[name].path})" for name in engine.prefix_names) or "none"
    print(
        f"serving {engine.model_name} with prefixes: {served}; http://{args.host}:{args.port}/v1"
        + (" (API key required)" if api_key else ""),
        flush=True,
    )
    try:
        uvicorn.run(create_app(engine, api_key), host=args.host, port=args.port, log_level=args.log_level)
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
