"""The built wheel as a user gets it: it installs only ``gateway`` (its default policy as
package data), and ``kvgate demo`` from that install, run away from the checkout, serves a chat
completion and stops cleanly on SIGTERM. Offline: the venv sees this machine's packages
(``--system-site-packages``) and the wheel is installed with ``--no-deps``."""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import socket
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from importlib.metadata import version
from pathlib import Path

import aiohttp
import pytest

from tests.integration.conftest import until_ready

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(180)]
ROOT = Path(__file__).resolve().parents[2]
MODEL = "llama-3.1-8b"  # the default policy's model


@dataclass(frozen=True)
class Install:
    wheel: Path
    venv: Path
    site_packages: Path
    workdir: Path  # a folder outside the checkout, to run from

    def env(self) -> dict[str, str]:
        return {"PATH": f"{self.venv / 'bin'}:/usr/bin:/bin", "HOME": str(self.workdir)}

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            args, cwd=self.workdir, env=self.env(), capture_output=True, text=True, timeout=60
        )


def _run(*args: str | Path, cwd: Path) -> None:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(map(str, args))}:\n{done.stdout}\n{done.stderr}"


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Install:
    setuptools = version("setuptools")
    assert int(setuptools.split(".")[0]) >= 77, (
        f"setuptools {setuptools} cannot build this pyproject.toml without build isolation; "
        "the test extra installs one that can: pip install -e '.[test]'"
    )
    tmp = tmp_path_factory.mktemp("wheel")
    # A copy of the checkout without build output: setuptools packs whatever a stale build/
    # holds (a package a past layout had), and the checkout is left as it was.
    source = tmp / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(
            ".git", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", ".hypothesis"
        ),
    )
    wheels = tmp / "wheels"
    build = (sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w")
    _run(*build, wheels, ".", cwd=source)
    (wheel,) = wheels.glob("kvgate-*.whl")
    venv = tmp / "venv"
    # without pip: its site-packages then holds only what the wheel installs
    _run(sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv, cwd=tmp)
    python = venv / "bin" / "python"
    pip = (sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--quiet")
    _run(*pip, wheel, cwd=tmp)
    (site_packages,) = (venv / "lib").glob("python3*/site-packages")
    workdir = tmp / "work"
    workdir.mkdir()
    return Install(wheel, venv, site_packages, workdir)


def test_the_wheel_installs_only_gateway(installed: Install) -> None:
    with zipfile.ZipFile(installed.wheel) as wheel:
        names = wheel.namelist()
    dist_info = installed.wheel.name.split("-py")[0] + ".dist-info"
    assert {name.split("/")[0] for name in names} == {"gateway", dist_info}
    assert not [n for n in names if {"loadtest", "tests"} & set(n.split("/"))]
    assert sorted(p.name for p in installed.site_packages.iterdir()) == sorted(
        ["gateway", dist_info]
    )
    record = (installed.site_packages / dist_info / "RECORD").read_text()
    top = {line.split("/")[0].split(",")[0] for line in record.splitlines() if line}
    assert top <= {"gateway", dist_info, "..", "__pycache__"}, top  # ..: the kvgate script
    assert "gateway" in top


def test_the_default_policy_is_package_data_of_the_installed_gateway(installed: Install) -> None:
    code = (
        "import json, importlib.resources, gateway, gateway.policies\n"
        "data = importlib.resources.files('gateway.policies')\n"
        "print(json.dumps({'gateway': gateway.__file__,\n"
        "    'default': data.joinpath('default.yaml').read_text(),\n"
        "    'files': sorted(p.name for p in data.iterdir())}))\n"
    )
    done = installed.run("python", "-c", code)
    assert done.returncode == 0, done.stderr
    found = json.loads(done.stdout)
    assert Path(found["gateway"]).is_relative_to(installed.site_packages)  # not the checkout
    assert found["default"] == (ROOT / "policies" / "default.yaml").read_text()
    assert "default.yaml" in found["files"]
    assert "examples" in found["files"]


def test_kvgate_finds_its_bundled_policy_away_from_the_checkout(installed: Install) -> None:
    request = installed.workdir / "request.json"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x" * 400}]}
    request.write_text(json.dumps({**body, "max_tokens": 200}))
    # no -c: the policy comes from the installed package data
    done = installed.run("kvgate", "explain", "--tenant", "team-a", str(request))
    assert done.returncode == 0, done.stderr
    assert "output_tokens (reserved)   200" in done.stdout
    assert "passes now" in done.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_kvgate_demo_from_the_wheel_serves_and_stops_on_sigterm(installed: Install) -> None:
    port = _free_port()
    proc = await asyncio.create_subprocess_exec(  # the shipped policy, on free ports
        installed.venv / "bin" / "kvgate",
        "demo",
        "--port",
        str(port),
        "--backend-port",
        str(_free_port()),
        "--admin-port",
        str(_free_port()),
        cwd=installed.workdir,
        env=installed.env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        async with aiohttp.ClientSession() as session:
            await until_ready(session, url, timeout_s=30)
            chat = {"model": MODEL, "messages": [{"role": "user", "content": "Hello!"}]}
            async with session.post(
                f"{url}/v1/chat/completions", json={**chat, "max_tokens": 8}
            ) as response:
                assert response.status == 200
                # the gateway's answer, not the simulator's: it carries the bucket's levels
                assert "x-ratelimit-remaining-requests" in response.headers
                answer = await response.json()
            assert answer["model"] == MODEL
            assert answer["choices"][0]["message"]["content"]
            assert 0 < answer["usage"]["completion_tokens"] <= 8
            async with session.post(
                f"{url}/v1/chat/completions", json={**chat, "max_tokens": 8, "stream": True}
            ) as streamed:
                assert streamed.status == 200
                text = await streamed.text()
            assert text.endswith("data: [DONE]\n\n")
        proc.send_signal(signal.SIGTERM)
        out, err = await asyncio.wait_for(proc.communicate(), 15)
        assert proc.returncode == 0, err.decode()
        assert (
            f"kvgate demo: a simulated GPU serving {MODEL!r} behind kvgate at {url}" in out.decode()
        )
        assert b"Traceback" not in err
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
