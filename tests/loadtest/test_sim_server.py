"""The simulated GPU over real HTTP on 127.0.0.1: OpenAI shapes, streaming, metrics, loading,
restart, crash, OOM and disconnects. Fast servers use a large time_scale; tests that need a
request to stay in flight give it a long output and end it themselves."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import openai
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient

from gateway.sim.__main__ import build_parser, load_config, main
from gateway.sim.config import SimConfig
from gateway.sim.server import RUNTIME, build_app, serve

MODEL = "sim-model"
FAST = SimConfig(model=MODEL, time_scale=1000.0)
SLOW = SimConfig(model=MODEL, decode_step_s=0.05, time_scale=1.0)  # 20 tokens per wall second
Client = TestClient[web.Request, web.Application]

CHAT = "/v1/chat/completions"


def chat(max_tokens: int, output: int | None = None, **extra: object) -> dict[str, object]:
    body: dict[str, object] = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "Say something about KV caches."}],
        "max_tokens": max_tokens,
        **extra,
    }
    if output is not None:
        body["sim_output_tokens"] = output
    return body


async def start(aiohttp_client: AiohttpClient, config: SimConfig) -> Client:
    return await aiohttp_client(build_app(config))


async def stats(client: Client) -> dict[str, Any]:
    resp = await client.get("/sim/stats")
    assert resp.status == 200
    data: dict[str, Any] = await resp.json()
    return data


async def wait_until(client: Client, ready: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Poll /sim/stats until ``ready`` holds (bounded by the test timeout)."""
    while True:
        current = await stats(client)
        if ready(current):
            return current
        await asyncio.sleep(0.01)


async def sse_events(resp: aiohttp.ClientResponse) -> list[str]:
    """The ``data:`` payloads of a finished SSE response, in order."""
    text = await resp.text()
    events = [block for block in text.split("\n\n") if block]
    assert all(block.startswith("data: ") for block in events)
    return [block.removeprefix("data: ") for block in events]


async def test_chat_completion_has_openai_shape_and_usage(aiohttp_client: AiohttpClient) -> None:
    client = await start(aiohttp_client, FAST)
    resp = await client.post(CHAT, json=chat(max_tokens=5, output=3))
    assert resp.status == 200
    body = await resp.json()
    assert body["id"].startswith("chatcmpl-")
    assert (body["object"], body["model"]) == ("chat.completion", MODEL)
    assert isinstance(body["created"], int)
    choice = body["choices"][0]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"] == " the quick b"
    assert choice["finish_reason"] == "stop"
    prompt = 3 + 4 + 8  # 30 characters at 4 per token, plus per-message and priming overhead
    assert body["usage"] == {
        "prompt_tokens": prompt,
        "completion_tokens": 3,
        "total_tokens": prompt + 3,
    }


async def test_completion_stops_at_max_tokens(aiohttp_client: AiohttpClient) -> None:
    client = await start(aiohttp_client, FAST)
    body = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 2, "sim_output_tokens": 9}
    resp = await client.post("/v1/completions", json=body)
    data = await resp.json()
    assert data["id"].startswith("cmpl-")
    assert data["object"] == "text_completion"
    assert data["choices"][0]["finish_reason"] == "length"
    assert data["usage"]["prompt_tokens"] == 3
    assert data["usage"]["completion_tokens"] == 2


async def test_stream_sends_one_chunk_per_token_and_usage_only_on_request(
    aiohttp_client: AiohttpClient,
) -> None:
    client = await start(aiohttp_client, FAST)
    resp = await client.post(CHAT, json=chat(max_tokens=8, output=4, stream=True))
    assert resp.headers["Content-Type"].startswith("text/event-stream")
    events = await sse_events(resp)
    assert events[-1] == "[DONE]"
    chunks = [msgspec.json.decode(e) for e in events[:-1]]
    assert [c["choices"][0]["delta"] for c in chunks] == [
        {"role": "assistant", "content": ""},
        {"content": " the"},
        {"content": " qui"},
        {"content": "ck b"},
        {"content": "rown"},
        {},
    ]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in c for c in chunks)
    assert len({c["id"] for c in chunks}) == 1

    resp = await client.post(
        CHAT,
        json=chat(max_tokens=8, output=4, stream=True, stream_options={"include_usage": True}),
    )
    chunks = [msgspec.json.decode(e) for e in (await sse_events(resp))[:-1]]
    assert all(c["usage"] is None for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["completion_tokens"] == 4


async def test_streamed_completion_text(aiohttp_client: AiohttpClient) -> None:
    client = await start(aiohttp_client, FAST)
    body = {
        "model": MODEL,
        "prompt": "abcd",
        "max_tokens": 2,
        "stream": True,
        "sim_output_tokens": 2,
    }
    events = await sse_events(await client.post("/v1/completions", json=body))
    chunks = [msgspec.json.decode(e) for e in events[:-1]]
    assert [c["choices"][0]["text"] for c in chunks] == [" the", " qui", ""]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_openai_sdk_reads_stream_and_usage(aiohttp_client: AiohttpClient) -> None:
    client = await start(aiohttp_client, FAST)
    sdk = openai.AsyncOpenAI(base_url=str(client.make_url("/v1")), api_key="unused")
    try:
        stream = await sdk.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"sim_output_tokens": 3},
        )
        pieces = [c.choices[0].delta.content async for c in stream if c.choices]
        assert "".join(p or "" for p in pieces) == " the quick b"
        assert stream.response.status_code == 200
    finally:
        await sdk.close()


async def test_bad_requests_get_openai_errors(aiohttp_client: AiohttpClient) -> None:
    client = await start(aiohttp_client, SimConfig(model=MODEL, kv_blocks=4, time_scale=1000.0))
    resp = await client.post(CHAT, json={**chat(max_tokens=5), "model": "other"})
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "model_not_found"
    resp = await client.post(CHAT, json=chat(max_tokens=64))  # 64 + 15 > 4 * 16
    assert resp.status == 400
    error = (await resp.json())["error"]
    assert error["code"] == "context_length_exceeded"
    assert "maximum context length is 64 tokens" in error["message"]
    resp = await client.post(CHAT, json=chat(max_tokens=5, n=2))
    assert resp.status == 400
    resp = await client.post(CHAT, data=b"{not json")
    assert resp.status == 400
    assert (await resp.json())["error"]["type"] == "invalid_request_error"


async def test_models_lists_the_model(aiohttp_client: AiohttpClient) -> None:
    client = await start(aiohttp_client, FAST)
    data = await (await client.get("/v1/models")).json()
    assert data["object"] == "list"
    assert [m["id"] for m in data["data"]] == [MODEL]
    assert data["data"][0]["max_model_len"] == FAST.kv_blocks * FAST.block_size


async def test_metrics_parse_with_vllm_names(aiohttp_client: AiohttpClient) -> None:
    config = SimConfig(model=MODEL, kv_blocks=100, block_size=8, time_scale=1000.0)
    client = await start(aiohttp_client, config)
    for _ in range(2):
        await client.post(CHAT, json=chat(max_tokens=5, output=5))
    text = await (await client.get("/metrics")).text()
    samples = {s.name: s for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples["vllm:generation_tokens_total"].value == 10
    assert samples["vllm:prompt_tokens_total"].value == 2 * 15
    assert samples["vllm:num_preemptions_total"].value == 0
    assert samples["vllm:num_requests_running"].value == 0
    assert samples["vllm:num_requests_waiting"].value == 0
    assert samples["vllm:kv_cache_usage_perc"].value == 0
    info = samples["vllm:cache_config_info"]
    assert {
        k: info.labels[k] for k in ("model_name", "engine", "num_gpu_blocks", "block_size")
    } == {
        "model_name": MODEL,
        "engine": "0",
        "num_gpu_blocks": "100",
        "block_size": "8",
    }
    assert info.labels["kv_cache_size_tokens"] == "800"
    assert info.labels["kv_cache_memory_bytes"] == str(800 * config.kv_bytes_per_token)
    assert {"cache_dtype", "enable_prefix_caching", "gpu_memory_utilization"} <= set(info.labels)
    assert info.labels["enable_prefix_caching"] == "False"
    assert samples["vllm:prefix_cache_queries_total"].value == 0
    assert samples["vllm:prefix_cache_hits_total"].value == 0
    assert samples["kvgate_gpu_fragmentation_ratio"].value == 0
    assert (
        samples["kvgate_gpu_largest_free_block_bytes"].value == 100 * 8 * config.kv_bytes_per_token
    )
    assert samples["kvgate_sim_oom_errors_total"].value == 0
    assert all(s.labels["model_name"] == MODEL for s in samples.values())
    assert all(s.labels["engine"] == "0" for s in samples.values())


async def test_metrics_count_prefix_cache_queries_and_hits(aiohttp_client: AiohttpClient) -> None:
    config = SimConfig(model=MODEL, block_size=16, prefix_caching=True, time_scale=1000.0)
    client = await start(aiohttp_client, config)
    system = "You are a helpful assistant. " * 20  # 580 characters: 9 full blocks of 64
    for question in ("first?", "second?"):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        body = {"model": MODEL, "messages": messages, "max_tokens": 2, "sim_output_tokens": 2}
        resp = await client.post(CHAT, json=body)
        assert (await resp.json())["usage"]["prompt_tokens"] == 145 + 4 + 2 + 4 + 3
    text = await (await client.get("/metrics")).text()
    samples = {s.name: s for family in text_string_to_metric_families(text) for s in family.samples}
    assert samples["vllm:prefix_cache_queries_total"].value == 2 * 158
    assert samples["vllm:prefix_cache_hits_total"].value == 9 * 16  # the second hit the first's
    assert samples["vllm:prefix_cache_hits_total"].labels == {"model_name": MODEL, "engine": "0"}
    assert samples["vllm:cache_config_info"].labels["enable_prefix_caching"] == "True"
    assert (await stats(client))["prefix_cache_hits"] == 9 * 16


async def test_loading_answers_503_except_health_and_sim(aiohttp_client: AiohttpClient) -> None:
    client = await start(aiohttp_client, SimConfig(model=MODEL, load_time_s=3600.0))
    resp = await client.get("/health")
    assert (resp.status, await resp.json()) == (503, {"status": "loading"})
    for method, path in (("GET", "/v1/models"), ("GET", "/metrics"), ("POST", CHAT)):
        resp = await client.request(method, path, json=chat(max_tokens=5))
        assert resp.status == 503
        assert await resp.json() == {
            "error": {"message": "Loading model", "type": "unavailable_error", "code": 503}
        }
    assert (await stats(client))["phase"] == "loading"


async def test_becomes_ready_after_load_time(aiohttp_client: AiohttpClient) -> None:
    client = await start(aiohttp_client, SimConfig(model=MODEL, load_time_s=5.0, time_scale=50.0))
    await wait_until(client, lambda s: s["phase"] != "loading")
    assert (await client.get("/health")).status == 200
    resp = await client.post(CHAT, json=chat(max_tokens=2, output=2))
    assert resp.status == 200


async def test_restart_fails_requests_in_flight_then_reloads(
    aiohttp_client: AiohttpClient,
) -> None:
    client = await start(aiohttp_client, SLOW)
    whole = asyncio.create_task(client.post(CHAT, json=chat(max_tokens=5000, output=5000)))
    streamed = await client.post(CHAT, json=chat(max_tokens=5000, output=5000, stream=True))
    assert streamed.status == 200
    await streamed.content.readuntil(b"\n\n")  # tokens are flowing
    await wait_until(client, lambda s: s["running"] == 2)
    resp = await client.post("/admin/restart", json={"load_time_s": 3600})
    assert await resp.json() == {"status": "loading", "ready_in_s": 3600.0}
    failed = await whole
    assert failed.status == 500
    assert (await failed.json())["error"]["code"] == "engine_dead"
    with pytest.raises(aiohttp.ClientPayloadError):
        await streamed.read()  # the connection drops without [DONE]
    assert (await client.get("/health")).status == 503
    after = await stats(client)
    assert (after["restarts"], after["failed"], after["running"]) == (1, 2, 0)


async def test_client_disconnect_frees_its_sequence(aiohttp_client: AiohttpClient) -> None:
    client = await start(aiohttp_client, SLOW)
    streamed = await client.post(CHAT, json=chat(max_tokens=5000, output=5000, stream=True))
    await streamed.content.readuntil(b"\n\n")
    streamed.close()
    await wait_until(client, lambda s: s["cancelled"] == 1 and s["running"] == 0)

    whole = asyncio.create_task(client.post(CHAT, json=chat(max_tokens=5000, output=5000)))
    await wait_until(client, lambda s: s["running"] == 1)
    whole.cancel()
    with pytest.raises(asyncio.CancelledError):
        await whole
    final = await wait_until(client, lambda s: s["cancelled"] == 2 and s["running"] == 0)
    assert final["kv_usage"] == 0


async def test_contiguous_oom_is_a_500_and_repeated_ooms_crash(
    aiohttp_client: AiohttpClient,
) -> None:
    config = SimConfig(
        model=MODEL,
        mode="contiguous",
        kv_blocks=10,
        block_size=1,
        decode_step_s=0.05,
        oom_crash_after=2,
    )
    client = await start(aiohttp_client, config)
    body = {"model": MODEL, "prompt": [1], "max_tokens": 6, "sim_output_tokens": 6}
    holder = await client.post("/v1/completions", json={**body, "stream": True})  # 7 of 10 blocks
    await holder.content.readuntil(b"\n\n")
    resp = await client.post("/v1/completions", json={**body, "max_tokens": 5, "stream": True})
    assert resp.status == 500
    error = (await resp.json())["error"]
    assert (error["type"], error["code"]) == ("server_error", "oom")
    assert error["message"].startswith("CUDA out of memory. Tried to allocate")
    resp = await client.post("/v1/completions", json={**body, "max_tokens": 5})
    assert resp.status == 500  # the second OOM within 10 s crashes the server
    with pytest.raises(aiohttp.ClientPayloadError):
        await holder.read()  # the crash cut the stream in flight
    after = await stats(client)
    assert (after["crashes"], after["oom_errors"], after["failed"]) == (1, 2, 3)


# ---- CLI -------------------------------------------------------------------------------------


def test_cli_flags_override_the_config_file(tmp_path: Path) -> None:
    path = tmp_path / "sim.yaml"
    path.write_text("mode: contiguous\nkv_blocks: 64\ndecode_step_s: 0.01\n")
    args = build_parser().parse_args(["--config", str(path), "--kv-blocks", "128"])
    config = load_config(args)
    assert (config.mode, config.kv_blocks, config.decode_step_s) == ("contiguous", 128, 0.01)
    assert config.block_size == SimConfig().block_size
    for word, value in (("true", True), ("False", False), ("1", True)):
        assert (
            load_config(build_parser().parse_args(["--prefix-caching", word])).prefix_caching
            is value
        )
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--prefix-caching", "maybe"])


def test_cli_refuses_a_bad_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--kv-blocks", "0"]) == 2
    assert "kv_blocks=0" in capsys.readouterr().err
    path = tmp_path / "sim.yaml"
    path.write_text("kv_blocks: many\n")
    assert main(["--config", str(path)]) == 2
    assert "sim.yaml" in capsys.readouterr().err


async def test_cli_serves_then_stops_cleanly_on_sigterm() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway.sim",
        "--port",
        "0",
        "--time-scale",
        "100",
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), 30)).decode()
        url = line.split()[3]
        assert url.startswith("http://127.0.0.1:")
        async with aiohttp.ClientSession() as session, session.get(f"{url}/health") as resp:
            assert resp.status == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 30) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


async def test_refuse_mode_opens_the_port_only_once_loaded() -> None:
    config = SimConfig(model=MODEL, load_time_s=200.0, time_scale=1000.0, loading="refuse")
    runner = await serve(config, "127.0.0.1", 0)
    try:
        runtime = runner.app[RUNTIME]
        assert not runtime.sync().is_loading()  # serve() returned only when the load was over
        host, port = runner.addresses[0][:2]
        async with aiohttp.ClientSession() as session:
            resp = await session.get(f"http://{host}:{port}/health")
            assert resp.status == 200
    finally:
        await runner.cleanup()


async def test_refuse_mode_closes_the_port_while_a_restart_reloads() -> None:
    """As vLLM's API server, which is not bound while it restarts: the restart's answer still
    arrives, then connections are refused until the reload is over, on the same port."""
    config = SimConfig(model=MODEL, load_time_s=0.0, time_scale=1000.0, loading="refuse")
    runner = await serve(config, "127.0.0.1", 0)
    try:
        host, port = runner.addresses[0][:2]
        base = f"http://{host}:{port}"
        async with aiohttp.ClientSession() as session:
            # 2,000 simulated seconds: two seconds of wall time to look at the closed port
            resp = await session.post(f"{base}/admin/restart", json={"load_time_s": 2000.0})
            assert resp.status == 200
            assert (await resp.json())["status"] == "loading"
        async with aiohttp.ClientSession() as session:
            with pytest.raises(aiohttp.ClientConnectorError):
                await session.get(f"{base}/health")
            runtime = runner.app[RUNTIME]
            assert runtime.sync().is_loading()
            for _ in range(100):
                with contextlib.suppress(aiohttp.ClientConnectorError):
                    async with session.get(f"{base}/health") as up:
                        assert up.status == 200
                        break
                await asyncio.sleep(0.1)
            else:
                pytest.fail("the port did not open again after the reload")
            assert not runtime.sync().is_loading()
            assert runtime.engine.stats.restarts == 1
    finally:
        await runner.cleanup()


async def test_503_mode_listens_while_loading() -> None:
    runner = await serve(SimConfig(model=MODEL, load_time_s=3600.0), "127.0.0.1", 0)
    try:
        assert runner.app[RUNTIME].sync().is_loading()
        host, port = runner.addresses[0][:2]
        async with aiohttp.ClientSession() as session:
            resp = await session.get(f"http://{host}:{port}/health")
            assert resp.status == 503
    finally:
        await runner.cleanup()
