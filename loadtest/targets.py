"""The processes a comparison runs against: a fresh simulated backend per target, and a kvgate
gateway in front of it with a policy written from the scenario. Every process listens on a free
port of 127.0.0.1, logs to a file in the output directory, and is stopped (SIGTERM, then SIGKILL)
when its ``async with`` block ends.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import hashlib
import socket
import sys
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Literal

import aiohttp
import msgspec
import yaml

from gateway.sim.__main__ import LOADING_LINE
from gateway.sim.config import SimConfig
from loadtest.scenario import PolicyFragment, Scenario

GatewayTarget = Literal["count_limited", "kvgate"]
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0


class TargetError(RuntimeError):
    """A process did not start, or did not become healthy in time; the message has its log tail."""


def free_port() -> int:
    """A port nothing listens on now (the OS picks it; a race with other processes is possible
    but harmless here: the process would fail to bind and the harness says so)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def key_hash(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def merge(base: Mapping[str, object], extra: Mapping[str, object]) -> dict[str, object]:
    """Deep merge: mappings merge key by key, anything else in ``extra`` replaces."""
    out = copy.deepcopy(dict(base))
    for key, value in extra.items():
        current = out.get(key)
        if isinstance(current, dict) and isinstance(value, dict):
            out[key] = merge(current, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def build_policy(
    scenario: Scenario, target: GatewayTarget, backend_url: str, port: int
) -> dict[str, object]:
    """The policy (DESIGN.md §7 shape) the gateway target runs: common fragment, then the
    target's own; the harness fills the listen address, the backend URL and tenant identities.
    The count-limited target always runs with admission disabled."""
    fragments: list[PolicyFragment] = [scenario.gateway.common, getattr(scenario.gateway, target)]
    backend: dict[str, object] = {"url": backend_url}
    model: dict[str, object] = {}
    admission: dict[str, object] = {}
    tenants: dict[str, dict[str, object]] = {}
    for name, tenant in scenario.tenants.items():
        tenants[name] = {
            "keys": [key_hash(tenant.key)],
            "priority": tenant.priority,
            "weight": tenant.weight,
        }
    for fragment in fragments:
        backend = merge(backend, fragment.backend)
        model = merge(model, fragment.model)
        admission = merge(admission, fragment.admission)
        for name, extra in fragment.tenants.items():
            tenants[name] = merge(tenants[name], extra)
    model["backends"] = [backend]
    if target == "count_limited":
        admission["enabled"] = False
    policy: dict[str, object] = {
        "version": 1,
        # no load balancer to drain away from: the harness stops a gateway at once
        "server": {"host": "127.0.0.1", "port": port, "drain_delay": "0s"},
        "store": {"kind": "memory"},
        "models": {scenario.model: model},
        "tenants": tenants,
        "admission": admission,
    }
    for fragment in fragments:
        policy = merge(policy, fragment.top)
    return policy


class Process:
    """A child process of the harness, known by its pid only."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.name = name
        self.proc = proc
        self.log = log

    @classmethod
    async def start(cls, name: str, args: list[str], log: Path) -> Process:
        with log.open("wb") as out:
            proc = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
            )
        return cls(name, proc, log)

    def log_tail(self, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    async def wait_http(self, url: str, ready: frozenset[int] | None) -> None:
        """Poll ``url`` until it answers with a status in ``ready`` (any status when None)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + START_TIMEOUT_S
        timeout = aiohttp.ClientTimeout(total=2.0)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while loop.time() < give_up:
                if self.proc.returncode is not None:
                    raise TargetError(
                        f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                    )
                with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                    async with session.get(url) as resp:
                        if ready is None or resp.status in ready:
                            return
                await asyncio.sleep(0.1)
        raise TargetError(f"{self.name} not ready at {url} after {START_TIMEOUT_S:g}s")

    async def wait_log(self, line: str) -> None:
        """Poll the log until it holds ``line``."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + START_TIMEOUT_S
        while loop.time() < give_up:
            if self.proc.returncode is not None:
                raise TargetError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            with contextlib.suppress(OSError):
                if line in self.log.read_text(errors="replace"):
                    return
            await asyncio.sleep(0.05)
        raise TargetError(f"{self.name} did not log {line!r} after {START_TIMEOUT_S:g}s")

    async def wait_http_listening(self, url: str) -> None:
        """Poll until something accepts a TCP connection at ``url``'s port."""
        port = int(url.rsplit(":", 1)[1])
        loop = asyncio.get_running_loop()
        give_up = loop.time() + START_TIMEOUT_S
        while loop.time() < give_up:
            if self.proc.returncode is not None:
                raise TargetError(
                    f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
                )
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.1)
                continue
            writer.close()
            await writer.wait_closed()
            return
        raise TargetError(f"{self.name} not listening at {url} after {START_TIMEOUT_S:g}s")

    async def stop(self) -> None:
        if self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), STOP_TIMEOUT_S)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


@contextlib.asynccontextmanager
async def simulator(
    config: SimConfig, workdir: Path, name: str, wait: Literal["ready", "listening"], port: int
) -> AsyncIterator[str]:
    """A fresh simulator on ``port``; yields its base URL once it is ready (or merely
    listening: its load time starts when it listens)."""
    config_path = workdir / f"sim-{name}.yaml"
    config_path.write_text(yaml.safe_dump(msgspec.to_builtins(config), sort_keys=False))
    args = [sys.executable, "-m", "gateway.sim", "--host", "127.0.0.1", "--port", str(port)]
    args += ["--config", str(config_path)]
    proc = await Process.start(f"simulator ({name})", args, workdir / f"sim-{name}.log")
    url = f"http://127.0.0.1:{port}"
    try:
        if wait == "listening" and config.loading == "refuse" and config.load_time_s > 0:
            await proc.wait_log(LOADING_LINE)  # its port stays shut while it loads
        else:
            await proc.wait_http(url + "/health", frozenset({200}) if wait == "ready" else None)
        yield url
    finally:
        await proc.stop()


@contextlib.asynccontextmanager
async def gateway(
    scenario: Scenario, target: GatewayTarget, backend_url: str, workdir: Path
) -> AsyncIterator[str]:
    """A kvgate process for ``target`` in front of ``backend_url``; yields its base URL once
    ``/readyz`` answers 200 (or, when the scenario meets a cold backend, once it answers)."""
    port = free_port()
    policy_path = workdir / f"policy-{target}.yaml"
    policy = build_policy(scenario, target, backend_url, port)
    policy_path.write_text(yaml.safe_dump(policy, sort_keys=False))
    # an admin port of its own: gateways of other runs on this machine may hold the default
    admin = ["--admin-port", str(free_port())]
    args = [sys.executable, "-m", "gateway", "run", "-c", str(policy_path), *admin]
    proc = await Process.start(f"gateway ({target})", args, workdir / f"gateway-{target}.log")
    url = f"http://127.0.0.1:{port}"
    ready = frozenset({200}) if scenario.backend_wait == "ready" else None
    try:
        await proc.wait_http(url + "/readyz", ready)
        yield url
    finally:
        await proc.stop()


@contextlib.asynccontextmanager
async def limiter(
    backend_url: str, limit: int, max_wait_s: float | None, workdir: Path, name: str = "limiter"
) -> AsyncIterator[str]:
    """The concurrency limiter (``loadtest.limiter``) in front of ``backend_url``; yields its base
    URL once it answers anything (it proxies every path, so a loading backend's 503 counts)."""
    port = free_port()
    args = [sys.executable, "-m", "loadtest.limiter", "--backend", backend_url]
    args += ["--limit", str(limit), "--port", str(port)]
    if max_wait_s is not None:
        args += ["--max-wait", str(max_wait_s)]
    proc = await Process.start(f"limiter ({name})", args, workdir / f"{name}.log")
    url = f"http://127.0.0.1:{port}"
    try:
        await proc.wait_http_listening(url)
        yield url
    finally:
        await proc.stop()
