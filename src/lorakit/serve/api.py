"""The HTTP layer: a FastAPI app with OpenAI's endpoints (and vLLM's adapter endpoints).

Thin by design: handlers validate (pydantic models in :mod:`.schemas`), tokenize, hand the request
to the :class:`~lorakit.serve.engine.Engine` and relay its events, as JSON or as server-sent events.
Every error is OpenAI's body ``{"error": {"message", "type", "param", "code"}}``; 429 / 503 carry
``Retry-After``.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from .adapters_pool import AdapterPool
from .engine import Engine, Event, Handle
from .errors import AuthError, InvalidRequestError, ServeError, ShuttingDownError
from .metrics import ServeMetrics
from .sampling import SamplingParams
from .schemas import ChatCompletionRequest, CompletionRequest, LoadAdapterRequest, UnloadAdapterRequest, _Sampling

#: How often a non-streaming request checks whether its client is still there.
DISCONNECT_POLL_S = 0.25


@dataclass
class ServerState:
    """What the handlers share: the engine, its pool and metrics, the tokenizer and the limits."""

    engine: Engine
    pool: AdapterPool
    metrics: ServeMetrics
    tokenizer: Any
    base_name: str
    api_key: str | None = None
    max_tokens_cap: int = 512
    created: int = field(default_factory=lambda: int(time.time()))


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(exc: ServeError) -> JSONResponse:
    headers = {"Retry-After": str(max(1, round(exc.retry_after)))} if exc.retry_after is not None else None
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status,
                        headers=headers)


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return f"the request body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}", None
        where = ".".join(loc) or "body"
        param = param or (loc[0] if loc else None)
        msg = "unknown field (not part of the request schema)" if err.get("type") == "extra_forbidden" \
            else err.get("msg", "invalid")
        parts.append(f"{where}: {msg}")
    return "; ".join(dict.fromkeys(parts)) or "invalid request", param


def create_app(state: ServerState) -> FastAPI:
    """The FastAPI application serving ``state``."""
    app = FastAPI(title="lorakit serve", docs_url=None, redoc_url=None, openapi_url=None)
    engine, pool, tok = state.engine, state.pool, state.tokenizer

    @app.exception_handler(ServeError)
    async def _serve_error(request: Request, exc: ServeError) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error", param), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = "not_found" if exc.status_code == 404 else None
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {exc.detail}", "invalid_request_error",
                                       None, code), status_code=exc.status_code)

    if state.api_key:
        app.add_middleware(_BearerAuth, key=state.api_key)

    @app.get("/health")
    async def health() -> JSONResponse:
        status = "ok" if engine.accepting else "draining"
        return JSONResponse({"status": status, **engine.stats()}, status_code=200 if engine.accepting else 503)

    @app.get("/metrics")
    async def metrics() -> Response:
        body, ctype = state.metrics.render()
        return Response(body, media_type=ctype)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        resident = set(pool.resident_names())
        data = [{"id": state.base_name, "object": "model", "created": state.created, "owned_by": "lorakit",
                 "root": state.base_name, "parent": None}]
        for name in pool.available():
            e = pool.entries.get(name)
            data.append({"id": name, "object": "model", "created": state.created, "owned_by": "lorakit",
                         "root": str(e.path) if e else name, "parent": state.base_name, "resident": name in resident})
        return {"object": "list", "data": data}

    def adapter_for(model: str) -> str | None:
        return None if model == state.base_name else model

    def params_for(body: _Sampling, n_prompt: int, max_tokens: int | None, param: str, default: int) -> SamplingParams:
        if max_tokens is not None and max_tokens > state.max_tokens_cap:
            raise InvalidRequestError(f"{param}: {max_tokens} is over this server's cap of {state.max_tokens_cap}"
                                      " (--max-tokens-cap)", param=param)
        if max_tokens is None:
            max_tokens = max(1, min(default, state.max_tokens_cap, engine.max_context - n_prompt))
        return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                              stop=body.stops())

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        p = body.prompt
        if isinstance(p, list) and p and isinstance(p[0], str):
            if len(p) != 1:
                raise InvalidRequestError("prompt: one prompt per request (n=1)", param="prompt")
            p = p[0]
        if isinstance(p, str):
            ids = list(tok(p)["input_ids"])
        else:
            ids = list(p)
            vocab = len(tok)
            if any(not 0 <= t < vocab for t in ids):
                raise InvalidRequestError(f"prompt: token ids must be in [0, {vocab})", param="prompt")
        params = params_for(body, len(ids), body.max_tokens, "max_tokens", 16)
        engine.check_length(len(ids), params.max_tokens, "prompt")
        return await _run(body, ids, params, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request) -> Response:
        msgs = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        except Exception as exc:  # noqa: BLE001 - jinja / missing template
            raise InvalidRequestError(f"messages: the model's chat template failed: {exc}", param="messages") from None
        ids = list(tok(text, add_special_tokens=False)["input_ids"])
        asked = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        param = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
        params = params_for(body, len(ids), asked, param, state.max_tokens_cap)
        engine.check_length(len(ids), params.max_tokens, "messages")
        return await _run(body, ids, params, request, chat=True)

    async def _run(body: _Sampling, ids: list[int], params: SamplingParams, request: Request,
                   chat: bool) -> Response:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()

        def sink(ev: Event) -> None:
            try:
                loop.call_soon_threadsafe(queue.put_nowait, ev)
            except RuntimeError:  # the event loop is gone (server stopped)
                pass

        handle = engine.submit(ids, params, adapter_for(body.model), sink)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex
        if body.stream:
            return StreamingResponse(_sse(handle, queue, body, rid, chat), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        text, last = [], None
        try:
            check = loop.time() + DISCONNECT_POLL_S
            while last is None:
                try:
                    ev: Event | None = await asyncio.wait_for(queue.get(), max(0.0, check - loop.time()))
                except TimeoutError:
                    ev = None
                if loop.time() >= check:  # every DISCONNECT_POLL_S, tokens arriving or not
                    if await request.is_disconnected():  # the client gave up: free the row
                        return Response(status_code=499)
                    check = loop.time() + DISCONNECT_POLL_S
                if ev is None:
                    continue
                if ev.kind == "token":
                    text.append(ev.text)
                else:
                    last = ev
        finally:
            if not handle.finished:
                handle.cancel()
        if last.kind == "error":
            raise last.error or ServeError("internal error")
        out = "".join(text)
        usage = _usage(last)
        if chat:
            choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": out},
                                      "logprobs": None, "finish_reason": last.finish_reason}
            return JSONResponse({"id": rid, "object": "chat.completion", "created": int(time.time()),
                                 "model": body.model, "choices": [choice], "usage": usage})
        choice = {"index": 0, "text": out, "logprobs": None, "finish_reason": last.finish_reason}
        return JSONResponse({"id": rid, "object": "text_completion", "created": int(time.time()),
                             "model": body.model, "choices": [choice], "usage": usage})

    async def _sse(handle: Handle, queue: asyncio.Queue[Event], body: _Sampling, rid: str,
                   chat: bool) -> AsyncIterator[str]:
        created = int(time.time())
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
            if chat:
                delta: dict[str, Any] = {} if text is None else {"content": text}
                if first:
                    delta["role"] = "assistant"
                c: dict[str, Any] = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
            else:
                c = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish}
            return _data({"id": rid, "object": obj, "created": created, "model": body.model, "choices": [c]})

        try:
            if chat:
                yield chunk("", None, first=True)
            while True:
                ev = await queue.get()
                if ev.kind == "token":
                    yield chunk(ev.text, None)
                    continue
                if ev.kind == "error":
                    err = ev.error or ServeError("internal error")
                    yield _data(error_body(err.message, err.type, err.param, err.code))
                else:
                    yield chunk(None, ev.finish_reason)
                    if body.include_usage():
                        yield _data({"id": rid, "object": obj, "created": created, "model": body.model,
                                     "choices": [], "usage": _usage(ev)})
                yield "data: [DONE]\n\n"
                return
        finally:
            if not handle.finished:
                handle.cancel()

    @app.post("/v1/load_lora_adapter")
    async def load_adapter(body: LoadAdapterRequest) -> dict[str, Any]:
        pool.register(body.lora_name, body.lora_path)
        entry = pool.entries[body.lora_name]
        try:
            internal = await asyncio.wrap_future(engine.call(lambda: pool.ensure_resident(entry)))
        except ShuttingDownError:
            pool.entries.pop(body.lora_name, None)
            raise
        return {"status": "ok", "lora_name": body.lora_name, "resident": internal is not None,
                "message": f"Success: LoRA adapter '{body.lora_name}' added successfully."}

    @app.post("/v1/unload_lora_adapter")
    async def unload_adapter(body: UnloadAdapterRequest) -> dict[str, Any]:
        await asyncio.wrap_future(engine.call(lambda: pool.unload(body.lora_name)))
        return {"status": "ok", "lora_name": body.lora_name,
                "message": f"Success: LoRA adapter '{body.lora_name}' removed successfully."}

    return app


class _BearerAuth:
    """Pure ASGI middleware (no wrapped ``receive``, so handlers still see client disconnects):
    every path but ``/health`` needs ``Authorization: Bearer <key>``."""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.want = app, f"Bearer {key}".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] != "/health":
            got = dict(scope.get("headers") or ()).get(b"authorization", b"")
            if not hmac.compare_digest(got, self.want):
                resp = error_response(AuthError("missing or invalid API key: send 'Authorization: Bearer <key>'"))
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _usage(ev: Event) -> dict[str, int]:
    return {"prompt_tokens": ev.prompt_tokens, "completion_tokens": ev.completion_tokens,
            "total_tokens": ev.prompt_tokens + ev.completion_tokens}


def _data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
