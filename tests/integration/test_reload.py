"""Hot reload against a real file edited on disk: a bad edit keeps the old policy serving, a later
good edit is applied, and SIGHUP after a failure still reloads a running ``kvgate run`` without
ending it. Real servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families

from gateway.app import build_app
from gateway.metrics import Metrics
from gateway.policy.watcher import read_policy
from tests.integration.conftest import MakeAdmin, policy_text, until, until_ready

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
CHAT = {"model": "m1", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 16}
ACME = {"Authorization": "Bearer sk-acme"}
TIGHT = "      - {unit: requests, rate: 1/min, burst: 2}"
NAN = "      - {unit: requests, rate: 1/min, burst: .nan}"
LOOSE = "      - {unit: requests, rate: 1000/s}"  # another period: a bucket of its own


def _reloads(metrics: Metrics, result: str) -> float:
    value = metrics.registry.get_sample_value("kvgate_policy_reloads_total", {"result": result})
    return 0.0 if value is None else value


async def _statuses(client: TestClient[web.Request, web.Application], n: int) -> list[int]:
    statuses = []
    for _ in range(n):
        async with client.post("/v1/chat/completions", json=CHAT, headers=ACME) as response:
            statuses.append(response.status)
    return statuses


async def test_a_bad_edit_keeps_the_old_policy_and_a_good_one_is_applied(
    tmp_path: Path,
    stub_url: str,
    aiohttp_client: Callable[..., Awaitable[TestClient[web.Request, web.Application]]],
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    admin: MakeAdmin,
) -> None:
    monkeypatch.setenv("ACME_KEY", "sk-acme")
    path = tmp_path / "policy.yaml"
    path.write_text(policy_text([stub_url], acme_limits=TIGHT))
    policy, digest = read_policy(path)
    metrics = Metrics()
    client = await aiohttp_client(build_app(policy, metrics=metrics, watch=(path, digest)))
    ops = await admin(client)
    for _ in range(200):
        if (await client.get("/readyz")).status == 200:
            break
        await asyncio.sleep(0.01)

    async def fingerprint() -> str:
        return str((await (await ops.get("/admin/state")).json())["policy"]["fingerprint"])

    path.write_text(policy_text([stub_url], acme_limits=NAN))
    await until(lambda: _reloads(metrics, "error") >= 1)
    assert await fingerprint() == policy.fingerprint
    assert await _statuses(client, 3) == [200, 200, 429]  # the old limit still holds
    [failure] = [r for r in caplog.records if "reload failed" in r.getMessage()]
    assert "limits[0].burst: Expected `float` > 0.0, got .nan" in failure.getMessage()

    path.write_text(policy_text([stub_url], acme_limits=LOOSE))
    await until(lambda: _reloads(metrics, "ok") >= 1)
    assert await fingerprint() != policy.fingerprint
    assert await _statuses(client, 3) == [200, 200, 200]

    bigger = policy_text([stub_url], acme_limits=LOOSE).replace("max_body: 64KiB", "max_body: 1MiB")
    path.write_text(bigger)
    await until(lambda: _reloads(metrics, "restart_required") >= 1)
    assert any("server.max_body 64KiB -> 1MiB" in r.getMessage() for r in caplog.records)
    assert _reloads(metrics, "error") == 1


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _reload_count(session: aiohttp.ClientSession, url: str, result: str) -> float:
    async with session.get(f"{url}/metrics") as response:
        text = await response.text()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if (
                sample.name == "kvgate_policy_reloads_total"
                and sample.labels.get("result") == result
            ):
                return float(sample.value)
    return 0.0


async def test_sighup_after_a_failed_reload_still_reloads_and_does_not_kill(
    tmp_path: Path, stub_url: str
) -> None:
    port, admin_port = _free_port(), _free_port()

    def text(limits: str) -> str:
        return policy_text([stub_url], acme_limits=limits).replace(
            "server:\n", f"server:\n  port: {port}\n  admin: {{port: {admin_port}}}\n", 1
        )

    path = tmp_path / "policy.yaml"
    path.write_text(text(TIGHT))
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "run",
        "-c",
        str(path),
        env={"PATH": "/usr/bin:/bin", "ACME_KEY": "sk-acme", "PYTHONPATH": str(ROOT)},
        stderr=asyncio.subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            await until_ready(session, url, timeout_s=20)

            async def count(result: str) -> float:
                return await _reload_count(session, f"http://127.0.0.1:{admin_port}", result)

            async def reaches(result: str, value: float) -> None:
                async with asyncio.timeout(15):
                    while await count(result) < value:  # noqa: ASYNC110 - another process
                        await asyncio.sleep(0.05)

            path.write_text(text(NAN))
            await reaches("error", 1)
            before = await count("error")
            proc.send_signal(signal.SIGHUP)  # the same broken file, read again
            await reaches("error", before + 1)
            assert proc.returncode is None

            path.write_text(text(LOOSE))
            proc.send_signal(signal.SIGHUP)
            await reaches("ok", 1)
            for _ in range(3):
                async with session.post(
                    f"{url}/v1/chat/completions", json=CHAT, headers=ACME
                ) as response:
                    assert response.status == 200
            proc.send_signal(signal.SIGHUP)  # unchanged: nothing to do, and still alive
            async with session.get(f"{url}/healthz") as health:
                assert health.status == 200
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 15) == 0
        assert proc.stderr is not None
        log = (await proc.stderr.read()).decode()
        assert log.count("policy reload failed") == 1  # logged once, counted every time
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
