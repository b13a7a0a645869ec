"""The simulated GPU as an OpenAI-compatible HTTP server (aiohttp).

Routes: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``,
``GET /health``, ``GET /metrics`` (vLLM names), and the simulator's own ``GET /sim/stats`` and
``POST /admin/restart``. With ``loading: refuse`` (as vLLM, whose API server is not bound until
its engine is up) the port is closed while the engine loads: ``serve`` opens it after the first
load, and a restart or a crash closes it (every connection too, once its response is out: the
restart's own answer still reaches the harness) until the reload is over. Otherwise, while
loading ``/health`` answers 503 ``{"status": "loading"}`` and the other OpenAI routes 503
"Loading model" (as llama.cpp does); ``/sim/*`` and ``/admin/*`` always answer, so a harness can
watch and restart a server that is down.

Failures: OOM (contiguous mode) is 500 ``code: "oom"``; a crash or restart fails a request in
flight with 500 ``code: "engine_dead"``, or drops the connection if its stream has started. A
client that goes away frees its sequence (for non-streaming requests this needs
``handler_cancellation=True``, which ``serve`` and aiohttp's test server set).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator

import msgspec
from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry

from gateway.sim.config import SimConfig
from gateway.sim.engine import ContextTooLong, EngineLoading, Failure
from gateway.sim.metrics import build_registry, exposition
from gateway.sim.runtime import SeqChannel, SimRuntime
from gateway.sim.wire import (
    ChunkEncoder,
    Kind,
    WireError,
    count_prompt_tokens,
    decode_request,
    error_body,
    prompt_block_hashes,
    response_body,
    token_text,
    usage,
)

RUNTIME = web.AppKey("runtime", SimRuntime)
REGISTRY = web.AppKey("registry", CollectorRegistry)
STARTED_AT = web.AppKey("started_at", int)  # Unix seconds, for /v1/models


class _PortKeeper:
    """``serve``'s task that closes the port while the engine reloads (``loading: refuse``);
    the app's cleanup ends it."""

    task: asyncio.Task[None] | None = None


PORT_KEEPER = web.AppKey("port_keeper", _PortKeeper)

_JSON = "application/json"
_LOADING = msgspec.json.encode(
    {"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}}
)
_ALWAYS_OPEN = ("/health", "/sim/", "/admin/")


def build_app(config: SimConfig) -> web.Application:
    """An app serving one simulated GPU; its step loop starts and stops with the app."""
    runtime = SimRuntime(config)
    app = web.Application(middlewares=[_loading_gate])
    app[RUNTIME] = runtime
    app[REGISTRY] = build_registry(runtime)
    app[STARTED_AT] = int(time.time())
    app[PORT_KEEPER] = _PortKeeper()
    app.cleanup_ctx.append(_drive)
    app.router.add_post("/v1/chat/completions", _chat_completions)
    app.router.add_post("/v1/completions", _completions)
    app.router.add_get("/v1/models", _models)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/sim/stats", _stats)
    app.router.add_post("/admin/restart", _restart)
    return app


async def serve(config: SimConfig, host: str, port: int) -> web.AppRunner:
    """Listen on ``host:port``; the caller owns the runner (``await runner.cleanup()``). With
    ``loading: refuse`` the engine's clock starts now but the port opens only once the first
    load is over, and closes again for every reload, so meanwhile a connection is refused."""
    app = build_app(config)
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    if config.loading != "refuse":
        await web.TCPSite(runner, host, port).start()
        return runner
    runtime = app[RUNTIME]
    await _until_loaded(runtime)
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound_port = runner.addresses[0][1]  # port 0 asked for any: reopen the one it got
    keeper = _refuse_while_reloading(runner, site, host, bound_port)
    app[PORT_KEEPER].task = asyncio.create_task(keeper, name="kvgate-sim-port")
    return runner


async def _until_loaded(runtime: SimRuntime) -> None:
    """Sleep until the engine is loaded (a restart meanwhile pushes the end further)."""
    while runtime.sync().is_loading():
        wall_s = (runtime.engine.ready_at - runtime.sim_now()) / runtime.config.time_scale
        await asyncio.sleep(max(0.0, wall_s))


async def _refuse_while_reloading(
    runner: web.AppRunner, site: web.TCPSite, host: str, port: int
) -> None:
    """Close the port, and the connections once their responses are out, at every reload;
    reopen the same port when the engine is up again."""
    runtime = runner.app[RUNTIME]
    while True:
        await runtime.reloading.wait()
        runtime.reloading.clear()
        await site.stop()
        if runner.server is not None:
            runner.server.pre_shutdown()
        await _until_loaded(runtime)
        site = web.TCPSite(runner, host, port)
        await site.start()


async def _drive(app: web.Application) -> AsyncIterator[None]:
    runtime = app[RUNTIME]
    runtime.start()
    task = asyncio.create_task(runtime.run(), name="kvgate-sim-steps")
    yield
    tasks = [task, app[PORT_KEEPER].task]
    for t in tasks:
        if t is not None:
            t.cancel()
    for t in tasks:
        if t is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await t


def _json(body: bytes, status: int = 200) -> web.Response:
    return web.Response(body=body, status=status, content_type=_JSON)


@web.middleware
async def _loading_gate(request: web.Request, handler: Handler) -> web.StreamResponse:
    if not request.path.startswith(_ALWAYS_OPEN) and request.app[RUNTIME].sync().is_loading():
        return _json(_LOADING, 503)
    return await handler(request)


async def _health(request: web.Request) -> web.Response:
    if request.app[RUNTIME].sync().is_loading():
        return _json(b'{"status":"loading"}', 503)
    return _json(b'{"status":"ok"}')


async def _models(request: web.Request) -> web.Response:
    runtime = request.app[RUNTIME]
    model = runtime.config.model
    card = {
        "id": model,
        "object": "model",
        "created": request.app[STARTED_AT],
        "owned_by": "kvgate-sim",
        "root": model,
        "parent": None,
        "max_model_len": runtime.engine.context_tokens,
    }
    return _json(msgspec.json.encode({"object": "list", "data": [card]}))


async def _metrics(request: web.Request) -> web.Response:
    body = exposition(request.app[REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def _stats(request: web.Request) -> web.Response:
    """The engine's ``EngineStats`` plus the driver's lag (simulated seconds)."""
    runtime = request.app[RUNTIME]
    snapshot = msgspec.structs.asdict(runtime.sync().snapshot())
    extra = {"lag_s": runtime.lag_s, "max_lag_s": runtime.max_lag_s}
    return _json(
        msgspec.json.encode({**snapshot, **extra, "time_scale": runtime.config.time_scale})
    )


class _RestartBody(msgspec.Struct, forbid_unknown_fields=True):
    load_time_s: float | None = None  # simulated seconds; default: the configured load_time_s


async def _restart(request: web.Request) -> web.Response:
    """Fail everything in flight and reload, optionally for a different ``load_time_s``."""
    raw = await request.read()
    try:
        body = msgspec.json.decode(raw, type=_RestartBody) if raw else _RestartBody()
        ready_in_s = request.app[RUNTIME].restart(body.load_time_s)
    except (msgspec.DecodeError, ValueError) as exc:
        return _json(error_body(str(exc), type_="invalid_request_error"), 400)
    return _json(msgspec.json.encode({"status": "loading", "ready_in_s": ready_in_s}))


async def _chat_completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "chat")


async def _completions(request: web.Request) -> web.StreamResponse:
    return await _generate(request, "completion")


async def _generate(request: web.Request, kind: Kind) -> web.StreamResponse:
    runtime = request.app[RUNTIME]
    cfg = runtime.config
    try:
        req = decode_request(kind, await request.read())
        if req.model != cfg.model:
            raise WireError(
                404,
                f"The model `{req.model}` does not exist.",
                param="model",
                code="model_not_found",
            )
        prompt_tokens = count_prompt_tokens(req, cfg.chars_per_token)
        hashes = (
            prompt_block_hashes(req, cfg.chars_per_token, cfg.block_size)
            if cfg.prefix_caching
            else None
        )
        seq_id, channel = runtime.submit(
            prompt_tokens, req.output_limit(), req.sim_output_tokens, hashes
        )
    except WireError as exc:
        return _json(exc.body(), exc.status)
    except EngineLoading:
        return _json(_LOADING, 503)
    except ContextTooLong as exc:
        param = "messages" if kind == "chat" else "prompt"
        body = error_body(
            str(exc), type_="invalid_request_error", param=param, code="context_length_exceeded"
        )
        return _json(body, 400)
    prefix = "chatcmpl" if kind == "chat" else "cmpl"
    head: dict[str, object] = {
        "id": f"{prefix}-{uuid.uuid4().hex}",
        "created": int(time.time()),
        "model": req.model,
    }
    try:
        if req.stream:
            return await _stream(request, kind, head, req.include_usage, prompt_tokens, channel)
        return await _whole(kind, head, prompt_tokens, channel)
    finally:
        runtime.release(seq_id)


async def _whole(
    kind: Kind, head: dict[str, object], prompt_tokens: int, channel: SeqChannel
) -> web.Response:
    while not channel.done:
        channel.changed.clear()
        await channel.changed.wait()
    if channel.failure is not None or channel.finish_reason is None:
        return _json(_failure_body(channel.failure), 500)
    text = "".join(token_text(i) for i in range(channel.tokens))
    use = usage(prompt_tokens, channel.tokens)
    return _json(response_body(kind, head, text, channel.finish_reason, use))


async def _stream(
    request: web.Request,
    kind: Kind,
    head: dict[str, object],
    include_usage: bool,
    prompt_tokens: int,
    channel: SeqChannel,
) -> web.StreamResponse:
    """One SSE event per token as the steps produce them. Headers wait for the first token, so a
    request that fails before it (OOM) still gets a proper 500."""
    while channel.tokens == 0 and not channel.done:
        channel.changed.clear()
        await channel.changed.wait()
    if channel.tokens == 0:
        return _json(_failure_body(channel.failure), 500)
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    encoder = ChunkEncoder(kind, head, include_usage)
    pending = [encoder.opening()]
    sent = 0
    try:
        while True:
            channel.changed.clear()
            while sent < channel.tokens:
                pending.append(encoder.token(sent))
                sent += 1
            if channel.finish_reason is not None:
                pending.append(encoder.closing(channel.finish_reason, usage(prompt_tokens, sent)))
                await response.write(b"".join(pending))
                await response.write_eof()
                return response
            await response.write(b"".join(pending))
            pending.clear()
            if channel.failure is not None:
                _drop_connection(request)  # what a client of a crashed server sees
                return response
            await channel.changed.wait()
    except ConnectionResetError:  # the client went away; release() frees the sequence
        return response


def _drop_connection(request: web.Request) -> None:
    transport = request.transport
    if transport is not None:
        transport.abort()


def _failure_body(failure: Failure | None) -> bytes:
    if failure is not None and failure.kind == "oom":
        return error_body(failure.message, type_="server_error", code="oom")
    message = failure.message if failure is not None else "the request ended without a result"
    return error_body(message, type_="server_error", code="engine_dead")
