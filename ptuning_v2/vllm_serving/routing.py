"""ASGI middleware for vLLM's OpenAI server: the request's ``model`` picks a prefix, as on the native engine.

Loaded by ``vllm serve --middleware ptuning_v2.vllm_serving.routing.PrefixRouting`` (``launch`` does it) and
finds the manifest through ``PTUNING_V2_VLLM_MANIFEST``. A request whose ``model`` is a prefix's name is
rewritten before vLLM reads it: ``model`` becomes the backbone's served name, ``kv_transfer_params`` names the
prefix for the connector, ``cache_salt`` keeps its cached blocks apart from every other prefix's, and the prompt
gets the prefix's P placeholder tokens in front (chat: through the chat template written by ``export``;
completions: as token ids). Since the placeholders are part of the prompt, vLLM's own context check counts them.
``GET /v1/models`` lists the prefixes after the backbone. Anything else passes through untouched.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from transformers import AutoTokenizer  # vLLM's own transformers, inside vLLM's environment

from .tables import MANIFEST_ENV, PREFIX_LENGTH_KWARG, PREFIX_PARAM, PrefixEntry, read_manifest

_GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")


class PrefixRouting:
    def __init__(self, app: Any) -> None:
        self.app = app
        self.manifest = read_manifest(os.environ[MANIFEST_ENV])
        # Completions prompts given as text become token ids here, tokenized as vLLM and the native engine do.
        self.tokenizer = AutoTokenizer.from_pretrained(self.manifest.model)

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["method"] == "POST" and scope["path"] in _GENERATION_PATHS:
            await self._generation(scope, receive, send)
        elif scope["type"] == "http" and scope["method"] == "GET" and scope["path"] == "/v1/models":
            await self.app(scope, receive, self._with_prefixes(send))
        else:
            await self.app(scope, receive, send)

    # ------------------------------------------------------------------ requests for a prefix

    async def _generation(self, scope: dict, receive: Any, send: Any) -> None:
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if message["type"] != "http.request" or not message.get("more_body"):
                break
        body = b"".join(chunks)
        try:
            request = json.loads(body)
        except ValueError:
            request = None  # vLLM answers malformed JSON itself
        entry = self.manifest.prefix(request.get("model")) if isinstance(request, dict) else None
        if entry is not None:
            try:
                request = self._for_prefix(scope["path"], request, entry)
            except ValueError as err:
                await _error(send, 400, str(err), param=err.args[1] if len(err.args) > 1 else None)
                return
            body = json.dumps(request).encode()
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-length"]
            scope = {**scope, "headers": [*headers, (b"content-length", str(len(body)).encode())]}
        sent = False

        async def replay() -> dict:
            nonlocal sent
            if sent:
                return await receive()  # after the body: disconnects
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}

        await self.app(scope, replay, send)

    def _for_prefix(self, path: str, request: dict, entry: PrefixEntry) -> dict:
        request = {
            **request,
            "model": self.manifest.model_name,
            "kv_transfer_params": {PREFIX_PARAM: entry.name},
            "cache_salt": entry.cache_salt,
        }
        if path == "/v1/chat/completions":
            if self.manifest.chat_template is None:
                raise ValueError(
                    f"the backbone has no chat template; use /v1/completions for prefix {entry.name!r}"
                )
            kwargs = request.get("chat_template_kwargs") or {}
            request["chat_template_kwargs"] = {**kwargs, PREFIX_LENGTH_KWARG: entry.length}
            return request
        if request.get("echo"):
            raise ValueError(
                f"echo with a prefix ({entry.name!r}) is not served by ENGINE=vllm: the echoed prompt would hold "
                "its placeholder tokens; use ENGINE=native",
                "echo",
            )
        request["prompt"] = self._prompt_ids(request.get("prompt"), entry)
        return request

    def _prompt_ids(self, prompt: Any, entry: PrefixEntry) -> Any:
        marks = [self.manifest.placeholder_id] * entry.length
        if isinstance(prompt, str):
            return marks + self._encode(prompt)
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            return marks + prompt
        if isinstance(prompt, list) and prompt and all(isinstance(p, str | list) for p in prompt):
            return [self._prompt_ids(p, entry) for p in prompt]
        return prompt  # vLLM refuses what it cannot read, with its own message

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]  # special tokens added, as vLLM and the native engine do

    # ------------------------------------------------------------------ /v1/models

    def _with_prefixes(self, send: Any) -> Any:
        start: dict = {}
        chunks: list[bytes] = []

        async def wrapped(message: dict) -> None:
            if message["type"] == "http.response.start":
                start.update(message)
                return
            chunks.append(message.get("body", b""))
            if message.get("more_body"):
                return
            body = b"".join(chunks)
            if start.get("status") == 200:
                body = self._models_body(body)
            headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body, "more_body": False})

        return wrapped

    def _models_body(self, body: bytes) -> bytes:
        try:
            listing = json.loads(body)
        except ValueError:
            return body
        if not isinstance(listing, dict) or not isinstance(listing.get("data"), list):
            return body
        created = int(time.time())
        for entry in self.manifest.prefixes:
            listing["data"].append(
                {
                    "id": entry.name,
                    "object": "model",
                    "created": created,
                    "owned_by": "ptuning_v2",
                    "root": entry.checkpoint,
                    "parent": self.manifest.model_name,
                }
            )
        return json.dumps(listing).encode()


async def _error(send: Any, status: int, message: str, param: str | None = None) -> None:
    body = json.dumps(
        {"error": {"message": message, "type": "invalid_request_error", "param": param, "code": None}}
    ).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
