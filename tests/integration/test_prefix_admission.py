"""A vLLM that caches prompt prefixes (its ``cache_config_info`` says so), behind a real
gateway: a second request sharing the first's long system prompt is reserved only what it
adds, while both are in flight."""

from __future__ import annotations

import pytest

from gateway.state import GATEWAY
from tests.integration.conftest import MakeGateway, until
from tests.integration.stub import StubBackend

pytestmark = pytest.mark.integration

SYSTEM = "You answer questions about GPU memory, briefly and precisely. " * 64  # 4 kB


def _metrics(caching: bool) -> str:
    return (
        'vllm:num_requests_running{model_name="m1"} 0\n'
        'vllm:num_requests_waiting{model_name="m1"} 0\n'
        'vllm:kv_cache_usage_perc{model_name="m1"} 0.0\n'
        'vllm:cache_config_info{block_size="16",num_gpu_blocks="4096",'
        f'enable_prefix_caching="{caching}"}} 1.0\n'
    )


def _body(question: str) -> dict[str, object]:
    return {
        "model": "m1",
        "stream": True,
        "max_tokens": 100,
        "messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": question},
        ],
    }


@pytest.mark.parametrize("caching", [True, False])
async def test_a_shared_system_prompt_is_reserved_once_where_the_backend_caches_it(
    make_gateway: MakeGateway, stub: StubBackend, stub_url: str, caching: bool
) -> None:
    stub.hold_stream = True
    stub.metrics = _metrics(caching)
    client, _ = await make_gateway(f"""
version: 1
server: {{anonymous_tenant: anon}}
models:
  m1:
    kv: {{layers: 32, kv_heads: 8, head_dim: 128}}
    context: 8192
    backends:
      - {{url: "{stub_url}", signals: vllm, probe_interval: 50ms}}
tenants:
  anon:
    limits: [{{unit: requests, rate: 1000/s}}]
admission:
  headroom: 0%
""")
    admitter = client.app[GATEWAY].admitter
    reserved: list[int] = []

    def backend(key: str) -> object:
        model = admitter.snapshot()["m1"]
        assert isinstance(model, dict)
        return model["backends"][0][key]

    def held() -> int:
        value = backend("reserved_bytes")
        assert isinstance(value, int)
        return value

    await until(lambda: backend("kind") == "bytes")  # scraped: its cache config is known
    assert admitter.caches_prefixes("m1") is caching

    streams = []
    try:
        for question in ("What is a KV cache?", "And what is a block table?"):
            before = held()
            response = await client.post("/v1/chat/completions", json=_body(question))
            assert response.status == 200
            assert (await response.content.readline()).startswith(b"data: ")
            streams.append(response)
            reserved.append(held() - before)
        stub.release.set()
        for response in streams:
            await response.read()
    finally:
        stub.release.set()
        for response in streams:
            response.release()
    first, second = reserved
    assert first > 0
    if caching:
        assert second < first / 3  # the 4 kB system prompt was held already
    else:
        assert second == first
