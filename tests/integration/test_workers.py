"""``kvgate run --workers 2`` as a user runs it: one port for both (and one admin port), one
/metrics for the group on the admin listener, a worker killed is started again, SIGTERM lets
requests in flight finish on every worker, and a supervisor killed with SIGKILL takes its
workers with it; the admin listener answers for the whole group."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from tests.integration.conftest import policy_text, until
from tests.integration.stub import StubBackend
from tests.integration.test_cli import ROOT, _free_port, _kvgate

pytestmark = pytest.mark.integration

ACME = {"Authorization": "Bearer sk-acme"}


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True, check=False)
    return sorted(int(p) for p in out.stdout.split())


def _alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper has ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _bindable(port: int) -> bool:
    """Nobody listens on 127.0.0.1:``port`` (bound without SO_REUSEPORT, so any holder counts)."""
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


_ORPHAN = """
import os, sys, time
from gateway.workers import tie_to_parent
parent = os.getpid()
child = os.fork()
if child == 0:
    tie_to_parent(parent, kernel=sys.argv[1] == "kernel")
    time.sleep(60)
    os._exit(0)
print(child, flush=True)
time.sleep(60)
"""


@pytest.mark.parametrize("way", ["kernel", "poll"])
def test_a_process_tied_to_its_parent_ends_when_the_parent_is_killed(way: str) -> None:
    with subprocess.Popen(
        [sys.executable, "-c", _ORPHAN, way],
        stdout=subprocess.PIPE,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    ) as parent:
        assert parent.stdout is not None
        child = int(parent.stdout.readline())
        try:
            parent.kill()
            parent.wait(10)
            deadline = time.monotonic() + 10
            while _alive(child) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert not _alive(child)
        finally:
            if _alive(child):
                os.kill(child, signal.SIGKILL)


async def _start_group(
    tmp_path: Path, stub_url: str, workers: int = 2, server: str = ""
) -> tuple[asyncio.subprocess.Process, str, str]:
    """``kvgate run --workers N`` in front of ``stub_url``, once every worker is in /metrics;
    (the supervisor, the proxy's URL, the admin URL)."""
    port, admin_port = _free_port(), _free_port()
    text = policy_text([stub_url]).replace(
        "server:\n",
        f"server:\n  port: {port}\n  admin: {{port: {admin_port}}}\n{server}",
        1,
    )
    (tmp_path / "policy.yaml").write_text(text)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *("-m", "gateway", "run", "-c", str(tmp_path / "policy.yaml"), "--workers", str(workers)),
        env={
            "PATH": "/usr/bin:/bin",
            "ACME_KEY": "sk-acme",
            "PYTHONPATH": str(ROOT),
            "TMPDIR": str(tmp_path),  # where the group's directory of sockets is made
        },
        stderr=asyncio.subprocess.DEVNULL,
    )
    url, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
    want = {str(i) for i in range(workers)}
    try:
        async with aiohttp.ClientSession() as session, asyncio.timeout(30):
            while True:
                try:
                    async with session.get(f"{admin}/metrics") as r:
                        if set(re.findall(r'worker="(\d+)"', await r.text())) == want:
                            break
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.1)
    except BaseException:
        proc.kill()
        await proc.wait()
        raise
    return proc, url, admin


async def test_workers_end_and_free_the_ports_when_the_supervisor_is_killed(
    tmp_path: Path, stub_url: str
) -> None:
    proc, url, admin = await _start_group(
        tmp_path, stub_url, server="  drain_delay: 0s\n  grace_period: 2s\n"
    )
    workers = _children(proc.pid)
    try:
        assert len(workers) == 2
        proc.kill()  # SIGKILL: the supervisor can pass nothing on
        await proc.wait()
        ports = [int(u.rpartition(":")[2]) for u in (url, admin)]
        async with asyncio.timeout(15):
            while any(_alive(w) for w in workers) or not all(map(_bindable, ports)):  # noqa: ASYNC110
                await asyncio.sleep(0.1)
        # the last worker out removed the group's directory
        assert [n for n in os.listdir(tmp_path) if n.startswith("kvgate-workers-")] == []
    finally:
        for w in filter(_alive, workers):
            os.kill(w, signal.SIGKILL)


async def test_two_workers_share_a_port_restart_and_drain(
    tmp_path: Path, stub: StubBackend, stub_url: str
) -> None:
    proc, url, admin = await _start_group(tmp_path, stub_url, server="  grace_period: 10s\n")
    try:
        async with aiohttp.ClientSession() as session:

            async def ready() -> bool:
                try:
                    async with session.get(f"{url}/readyz") as r:
                        return r.status == 200
                except aiohttp.ClientConnectionError:
                    return False

            async def workers_in_metrics() -> set[str]:
                async with session.get(f"{admin}/metrics") as r:
                    return set(re.findall(r'worker="(\d+)"', await r.text()))

            async with asyncio.timeout(20):
                while not (await ready() and await workers_in_metrics() == {"0", "1"}):  # noqa: ASYNC110
                    await asyncio.sleep(0.1)
            first = _children(proc.pid)
            assert len(first) == 2
            proc.send_signal(signal.SIGHUP)  # passed on to the workers: a reload, not a stop
            await asyncio.sleep(0.5)
            assert proc.returncode is None
            assert _children(proc.pid) == first
            assert await ready()
            os.kill(first[0], signal.SIGKILL)
            await until(lambda: len(set(_children(proc.pid)) - {first[0]}) == 2, 10)
            async with asyncio.timeout(20):
                while await workers_in_metrics() != {"0", "1"}:  # noqa: ASYNC110
                    await asyncio.sleep(0.1)

            stub.hold_first_byte = True
            body = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}
            requests = [
                asyncio.ensure_future(
                    session.post(
                        f"{url}/v1/chat/completions", json=body, headers={"Connection": "close"}
                    )
                )
                for _ in range(4)
            ]
            await until(lambda: len(stub.requests) >= 4, 10)
            proc.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.3)
            stub.release.set()
            for request in requests:
                response = await asyncio.wait_for(request, 10)
                assert response.status == 200
        assert await asyncio.wait_for(proc.wait(), 20) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_a_port_in_use_is_one_clear_line_before_any_worker_starts(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        admin_port = taken.getsockname()[1]
        text = policy_text(["http://127.0.0.1:9"]).replace(
            "server:\n", f"server:\n  port: {_free_port()}\n  admin: {{port: {admin_port}}}\n", 1
        )
        (tmp_path / "policy.yaml").write_text(text)
        result = _kvgate("run", "-c", str(tmp_path / "policy.yaml"), "--workers", "2")
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"kvgate: 127.0.0.1:{admin_port} is already in use" in result.stderr
    assert "--admin-port PORT" in result.stderr


async def test_the_admin_listener_answers_for_every_worker(
    tmp_path: Path, stub: StubBackend, stub_url: str
) -> None:
    proc, url, admin = await _start_group(tmp_path, stub_url)
    policy = tmp_path / "policy.yaml"
    try:
        async with aiohttp.ClientSession() as session:
            stub.hold_first_byte = True
            body = {"model": "m1", "messages": [{"role": "user", "content": "hi"}]}
            held = asyncio.ensure_future(
                session.post(f"{url}/v1/chat/completions", json=body, headers=ACME)
            )
            await until(lambda: len(stub.requests) == 1, 10)
            async with session.get(f"{admin}/admin/state") as r:
                state = await r.json()
            assert state["answered_by"] in {"0", "1"}
            assert set(state["workers"]) == {"0", "1"}
            inflight = {
                w: s["admission"]["m1"]["backends"][0]["inflight"]
                for w, s in state["workers"].items()
            }
            assert sorted(inflight.values()) == [0, 1]  # each worker's own, not one twice
            stub.release.set()
            assert (await asyncio.wait_for(held, 10)).status == 200

            policy.write_text(policy.read_text().replace("max_wait: 5s", "max_wait: 4s"))
            async with session.post(f"{admin}/admin/reload") as r:
                assert r.status == 200
                reloaded = (await r.json())["workers"]
            assert set(reloaded) == {"0", "1"}
            # the file watch may see the edit first: then the reload finds it unchanged
            assert {x["result"] for x in reloaded.values()} <= {"ok", "unchanged"}
            fingerprints = {x["policy"] for x in reloaded.values()}
            assert len(fingerprints) == 1
            async with session.get(f"{admin}/admin/state") as r:
                after = (await r.json())["workers"]
            assert {s["policy"]["fingerprint"] for s in after.values()} == fingerprints

            policy.write_text(policy.read_text().replace("max_wait: 4s", "max_wait: soon"))
            async with session.post(f"{admin}/admin/reload") as r:
                assert r.status == 422
                failed = (await r.json())["workers"]
            assert {x["result"] for x in failed.values()} == {"error"}
            assert {x["policy"] for x in failed.values()} == fingerprints  # the last good one
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)
