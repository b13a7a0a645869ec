"""The command line as a user runs it: validate, explain, and run with a graceful SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import socket
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest

import gateway
from tests.integration.conftest import policy_text, until, until_ready
from tests.integration.stub import StubBackend

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _kvgate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "ACME_KEY": "sk-acme"},
        timeout=60,
        check=False,
    )


def test_validate_accepts_good_files_and_names_the_line_of_a_bad_one() -> None:
    ok = _kvgate("validate", "policies/default.yaml")
    assert ok.returncode == 0
    assert "ok (fingerprint" in ok.stdout
    bad = _kvgate("validate", "policies/default.yaml", "policies/invalid/unknown_key.yaml")
    assert bad.returncode == 1
    assert "unknown_key.yaml: line 7, at $.models.llama.backends[0].warmpu" in bad.stderr


def test_validate_reports_every_error_of_a_file_and_never_a_traceback(tmp_path: Path) -> None:
    bad = _kvgate("validate", "policies/invalid/many_errors.yaml", str(tmp_path / "missing.yaml"))
    assert bad.returncode == 1
    lines = bad.stderr.splitlines()
    assert len(lines) == 5
    assert all(line.startswith("policies/invalid/many_errors.yaml: line ") for line in lines[:4])
    assert lines[4] == f"{tmp_path / 'missing.yaml'}: cannot read: No such file or directory"
    assert "Traceback" not in bad.stderr


def test_validate_offline_checks_a_file_without_its_secrets(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    text = (ROOT / "policies" / "examples" / "two-models-three-tenants.yaml").read_text()
    path.write_text(text)
    online = _kvgate("validate", str(path))
    assert online.returncode == 1
    assert "environment variable" in online.stderr
    assert "is not set" in online.stderr
    offline = _kvgate("validate", "--offline", str(path))
    assert offline.returncode == 0, offline.stderr
    assert "ok (fingerprint" in offline.stdout
    assert "secrets not read" in offline.stdout


def test_schema_prints_a_json_schema() -> None:
    result = _kvgate("schema")
    assert result.returncode == 0
    document = json.loads(result.stdout)
    assert document["title"] == "kvgate policy"
    policy = document["$defs"]["Policy"]
    assert set(policy["required"]) == {"version", "models"}
    assert policy["additionalProperties"] is False


def test_explain_shows_cost_and_limits(tmp_path: Path) -> None:
    request = tmp_path / "req.json"
    body = {"model": "llama-3.1-8b", "messages": [{"role": "user", "content": "x" * 400}]}
    request.write_text(json.dumps({**body, "max_tokens": 200}))
    result = _kvgate("explain", "-c", "policies/default.yaml", "--tenant", "team-a", str(request))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "input_tokens               107" in out  # ceil(400 / 4) + 4 per message + 3
    assert "output_tokens (reserved)   200" in out
    assert "t:team-a:*:tokens:60" in out
    assert "passes now" in out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_sigterm_fails_readiness_first_then_lets_requests_in_flight_finish(
    tmp_path: Path, stub: StubBackend, stub_url: str
) -> None:
    port, admin_port = _free_port(), _free_port()
    server = (
        f"server:\n  port: {port}\n  grace_period: 10s\n  drain_delay: 1s\n"
        f"  admin: {{port: {admin_port}}}\n"
    )
    text = policy_text([stub_url]).replace("server:\n", server, 1)
    (tmp_path / "policy.yaml").write_text(text)
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "gateway",
        "run",
        "-c",
        str(tmp_path / "policy.yaml"),
        env={"PATH": "/usr/bin:/bin", "ACME_KEY": "sk-acme", "PYTHONPATH": str(ROOT)},
        stderr=asyncio.subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            await until_ready(session, url, timeout_s=20)
            stub.hold_first_byte = True
            request = asyncio.ensure_future(
                session.post(
                    f"{url}/v1/chat/completions",
                    json={"model": "m1", "messages": [{"role": "user", "content": "hi"}]},
                )
            )
            await until(lambda: stub.requests)
            proc.send_signal(signal.SIGTERM)
            # the listeners stay open while the probes say the gateway is going away
            async with asyncio.timeout(5):
                while True:
                    async with session.get(f"{url}/readyz") as ready:
                        if ready.status == 503:
                            assert (await ready.json())["status"] == "draining"
                            break
                    await asyncio.sleep(0.02)
            admin = f"http://127.0.0.1:{admin_port}"
            async with session.get(f"{admin}/readyz") as ready:
                assert ready.status == 503
            stub.release.set()
            response = await asyncio.wait_for(request, 10)
            assert response.status == 200
            assert (await response.json())["usage"]["completion_tokens"] == 5
        assert await asyncio.wait_for(proc.wait(), 15) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()


def test_version() -> None:
    result = _kvgate("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"kvgate {gateway.__version__}"


def test_a_port_in_use_is_one_clear_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        text = policy_text(["http://127.0.0.1:9"]).replace(
            "server:\n", f"server:\n  port: {port}\n  admin: {{port: {_free_port()}}}\n", 1
        )
        (tmp_path / "policy.yaml").write_text(text)
        result = _kvgate("run", "-c", str(tmp_path / "policy.yaml"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    assert f"kvgate: 127.0.0.1:{port} is already in use" in result.stderr
    assert "--port PORT" in result.stderr


def test_demo_says_which_port_is_taken() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = _kvgate(
            "demo",
            "--port",
            str(_free_port()),
            "--backend-port",
            str(port),
            "--admin-port",
            str(_free_port()),
        )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"kvgate: 127.0.0.1:{port} is already in use (another kvgate, or a model server?); "
        "stop it or pass --backend-port PORT"
    )
    assert "Traceback" not in result.stderr
