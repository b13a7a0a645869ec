"""The processes of a real-backend benchmark: the limiter and kvgate in front of a real server,
each started here in its own session and stopped (with its children) at the end; the kvgate
policy written for the server from flags.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import yaml

from loadtest.real_report import Flavor
from loadtest.targets import free_port, key_hash, merge

TENANT = "bench"


TENANT_KEY = "sk-bench-real-0001"


@dataclass(frozen=True, slots=True, kw_only=True)
class GatewaySpec:
    model: str
    kv: tuple[int, int, int, str]  # layers, kv_heads, head_dim, dtype
    context: int
    chars_per_token: float
    signals: Flavor
    warmup: str = "0s"
    probe_interval: str = "500ms"
    max_wait: str = "120s"
    extra: Mapping[str, object] = field(default_factory=dict)


def parse_kv(text: str) -> tuple[int, int, int, str]:
    """``layers,kv_heads,head_dim[,dtype]`` (dtype defaults to bf16)."""
    parts = [p.strip() for p in text.split(",")]
    if len(parts) not in (3, 4):
        raise ValueError(f"--kv wants layers,kv_heads,head_dim[,dtype], got {text!r}")
    dtype = parts[3] if len(parts) == 4 else "bf16"
    return int(parts[0]), int(parts[1]), int(parts[2]), dtype


def kvgate_policy(spec: GatewaySpec, backend_url: str, port: int) -> dict[str, object]:
    """A policy for one real server: the model's KV profile, the flavor's signals (vLLM paged,
    llama.cpp slots, contiguous), admission at its defaults but for ``queue.max_wait``; then
    ``spec.extra`` deep-merged over the whole (to try other settings without editing code)."""
    layers, heads, dim, dtype = spec.kv
    backend: dict[str, object] = {
        "url": backend_url,
        "signals": spec.signals,
        "memory": "paged" if spec.signals == "vllm" else "contiguous",
        "warmup": spec.warmup,
        "probe_interval": spec.probe_interval,
    }
    policy: dict[str, object] = {
        "version": 1,
        "server": {"host": "127.0.0.1", "port": port, "access_log": False},
        "store": {"kind": "memory"},
        "models": {
            spec.model: {
                "kv": {"layers": layers, "kv_heads": heads, "head_dim": dim, "dtype": dtype},
                "context": spec.context,
                "default_max_tokens": min(1024, spec.context),
                "chars_per_token": spec.chars_per_token,
                "backends": [backend],
            }
        },
        "tenants": {TENANT: {"keys": [key_hash(TENANT_KEY)], "priority": "standard"}},
        "admission": {"queue": {"max_wait": spec.max_wait}},
    }
    return merge(policy, spec.extra)


class Child:
    """A process started here in its own session, so stopping it stops its children too
    (vLLM runs its engine in a child process)."""

    def __init__(self, name: str, proc: asyncio.subprocess.Process, log: Path) -> None:
        self.name, self.proc, self.log = name, proc, log

    @classmethod
    async def start(
        cls, name: str, args: Sequence[str], log: Path, env: Mapping[str, str] | None = None
    ) -> Child:
        with log.open("ab") as out:
            proc = await asyncio.create_subprocess_exec(
                *args,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
                env=None if env is None else {**os.environ, **env},
            )
        return cls(name, proc, log)

    @classmethod
    async def shell(cls, name: str, command: str, log: Path) -> Child:
        return await cls.start(name, ["/bin/sh", "-c", "exec " + command], log)

    def tail(self, lines: int = 15) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def signal(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, sig)

    async def stop(self, timeout_s: float = 20.0) -> None:
        if self.proc.returncode is None:
            self.signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), timeout_s)
            except TimeoutError:
                self.signal(signal.SIGKILL)
                await self.proc.wait()
        # Children left in the group (an engine process whose parent died) go too.
        self.signal(signal.SIGKILL)


async def wait_status(
    url: str, ready: Callable[[int], bool], timeout_s: float, child: Child | None = None
) -> float:
    """Poll ``url`` until its status passes ``ready``; returns the seconds it took."""
    loop = asyncio.get_running_loop()
    start = loop.time()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2.0)) as session:
        while loop.time() - start < timeout_s:
            if child is not None and child.proc.returncode is not None:
                raise RuntimeError(f"{child.name} exited:\n{child.tail()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                async with session.get(url) as resp:
                    if ready(resp.status):
                        return loop.time() - start
            await asyncio.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout_s:g}s")


@contextlib.asynccontextmanager
async def limiter(backend: str, limit: int, workdir: Path) -> AsyncIterator[str]:
    port = free_port()
    args = [sys.executable, "-m", "loadtest.limiter", "--backend", backend]
    args += ["--limit", str(limit), "--port", str(port)]
    child = await Child.start(f"limiter {limit}", args, workdir / f"limiter-{limit}.log")
    url = f"http://127.0.0.1:{port}"
    try:
        # The limiter proxies every path: its /health is the backend's.
        await wait_status(url + "/health", lambda s: s == 200, 30.0, child)
        yield url
    finally:
        await child.stop()


@contextlib.asynccontextmanager
async def kvgate(
    spec: GatewaySpec, backend: str, workdir: Path, wait_ready: bool = True
) -> AsyncIterator[str]:
    port = free_port()
    path = workdir / "policy-kvgate.yaml"
    path.write_text(yaml.safe_dump(kvgate_policy(spec, backend, port), sort_keys=False))
    args = [sys.executable, "-m", "gateway", "run", "-c", str(path)]
    child = await Child.start("kvgate", args, workdir / "kvgate.log")
    url = f"http://127.0.0.1:{port}"
    try:
        ok = (lambda s: s == 200) if wait_ready else (lambda s: True)
        await wait_status(url + "/readyz", ok, 60.0, child)
        yield url
    finally:
        await child.stop()
