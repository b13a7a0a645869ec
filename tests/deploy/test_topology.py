"""The compose stack's topology as processes on 127.0.0.1, for machines without a container
runtime: one simulated GPU, two gateways started by the image's entrypoint on the image's own
policy (store: redis), and a real Redis. A tenant's limit spans both replicas; each replica's
admin listener serves metrics that promtool accepts; the proxy port serves only the API."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import pytest
import redis

from tests.deploy.conftest import DEPLOY, ROOT, TEMPLATE, needs_admin_listener, promtool

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.redis, needs_admin_listener]

BURST = 6  # KVGATE_TENANT_REQUESTS=6/h: six requests pass, the seventh waits ten minutes
START_TIMEOUT_S = 30.0


@dataclass(frozen=True)
class Replica:
    url: str
    admin_url: str


@dataclass(frozen=True)
class Topology:
    replicas: tuple[Replica, Replica]
    api_key: str
    admin_token: str
    redis_url: str
    prefix: str


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def call(
    url: str, *, token: str | None = None, body: object = None
) -> tuple[int, bytes, dict[str, str]]:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data)
    if data is not None:
        request.add_header("Content-Type", "application/json")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.status, answer.read(), dict(answer.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def wait_ready(url: str, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"{url}: exited with {process.returncode} (logs: topology*/)")
        try:
            if call(f"{url}/readyz")[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.2)
    raise AssertionError(f"{url}/readyz: not ready within {START_TIMEOUT_S} s")


@pytest.fixture(scope="module")
def topology(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Topology]:
    logs = tmp_path_factory.mktemp("topology")
    processes: list[subprocess.Popen[bytes]] = []
    files: list[IO[bytes]] = []
    prefix = f"kvgate-topology-{uuid.uuid4().hex[:8]}"

    def start(name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        log = (logs / f"{name}.log").open("wb")
        files.append(log)
        process = subprocess.Popen(args, env=env, cwd=ROOT, stdout=log, stderr=log)
        processes.append(process)
        return process

    sim_port = free_port()
    start(
        "sim",
        [sys.executable, "-m", "gateway.sim", "--host", "127.0.0.1", "--port", str(sim_port)],
        dict(os.environ),
    )
    api_key, admin_token = uuid.uuid4().hex, uuid.uuid4().hex
    replicas = []
    try:
        for i in (1, 2):
            port, admin_port = free_port(), free_port()
            env = {
                **os.environ,
                "KVGATE_POLICY": str(TEMPLATE),
                "KVGATE_HOST": "127.0.0.1",
                "KVGATE_PORT": str(port),
                "KVGATE_ADMIN_HOST": "127.0.0.1",
                "KVGATE_ADMIN_PORT": str(admin_port),
                "KVGATE_BACKEND_URL": f"http://127.0.0.1:{sim_port}",
                "KVGATE_REDIS_URL": redis_url,
                "KVGATE_REDIS_PREFIX": prefix,
                "KVGATE_REPLICAS": "2",
                "KVGATE_API_KEY": api_key,
                "KVGATE_ADMIN_TOKEN": admin_token,
                "KVGATE_TENANT_REQUESTS": f"{BURST}/h",
            }
            process = start(
                f"kvgate-{i}", [sys.executable, str(DEPLOY / "docker" / "entrypoint.py")], env
            )
            replica = Replica(f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}")
            replicas.append((replica, process))
        for replica, process in replicas:
            wait_ready(replica.url, process)
        yield Topology((replicas[0][0], replicas[1][0]), api_key, admin_token, redis_url, prefix)
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)
        for log in files:
            log.close()
        client = redis.Redis.from_url(redis_url)
        keys = list(client.scan_iter(f"*{prefix}*"))
        if keys:
            client.delete(*keys)
        client.close()


def chat(replica: Replica, key: str) -> tuple[int, bytes, dict[str, str]]:
    body = {
        "model": "llama-3.1-8b",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 4,
    }
    return call(f"{replica.url}/v1/chat/completions", token=key, body=body)


def test_a_tenant_limit_spans_both_replicas(topology: Topology) -> None:
    """The whole burst through one replica empties the tenant's bucket on the other too. (Each
    replica counting alone would let the other pass; Redis unreachable, the fallback's half share
    would refuse the first replica's fourth request.)"""
    first, second = topology.replicas
    statuses = [chat(first, topology.api_key)[0] for _ in range(BURST)]
    assert statuses == [200] * BURST
    for replica in (second, first):
        status, body, headers = chat(replica, topology.api_key)
        assert status == 429
        assert json.loads(body)["error"]["type"] == "requests"
        assert float(headers["Retry-After"]) > 60
    client = redis.Redis.from_url(topology.redis_url)
    try:
        assert any(b":t:default:" in key for key in client.scan_iter(f"*{topology.prefix}*"))
    finally:
        client.close()


def test_unknown_key_is_refused_on_either_replica(topology: Topology) -> None:
    for replica in topology.replicas:
        assert chat(replica, "not-a-key")[0] == 401


def test_admin_listener_serves_metrics_to_the_token_only(topology: Topology) -> None:
    for replica in topology.replicas:
        assert call(f"{replica.admin_url}/metrics")[0] == 401
        status, page, _ = call(f"{replica.admin_url}/metrics", token=topology.admin_token)
        assert status == 200
        assert b"kvgate_requests_total" in page
        # nothing internal on the proxy port; the probes stay there for load balancers
        assert call(f"{replica.url}/metrics")[0] == 404
        assert call(f"{replica.url}/admin/state")[0] == 404
        assert call(f"{replica.url}/healthz")[0] == 200


def test_promtool_accepts_the_metrics_page(topology: Topology, tmp_path: Path) -> None:
    tool = promtool()
    for replica in topology.replicas:
        _, page, _ = call(f"{replica.admin_url}/metrics", token=topology.admin_token)
        result = subprocess.run(
            [tool, "check", "metrics"], input=page, capture_output=True, timeout=60, check=False
        )
        assert result.returncode == 0, (result.stdout + result.stderr).decode()
