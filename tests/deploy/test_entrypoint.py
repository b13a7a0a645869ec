"""The image's entrypoint: placeholders filled from the environment, literal policies served as
they are (so they hot-reload), the command the container runs, and its health check."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from gateway.errors import PolicyError
from gateway.policy.compile import compile_policy
from gateway.policy.loader import load_text
from tests.deploy.conftest import DEPLOY, TEMPLATE, load_entrypoint, needs_admin_listener

entrypoint = load_entrypoint()

REQUIRED = {"KVGATE_BACKEND_URL", "KVGATE_REDIS_URL"}
ENV = {
    "KVGATE_BACKEND_URL": "http://gpu:8000",
    "KVGATE_REDIS_URL": "redis://redis:6379/0",
    "KVGATE_API_KEY": "k-test",
    "KVGATE_ADMIN_TOKEN": "t-test",
}


def test_render_fills_variables_and_defaults() -> None:
    text = "a: ${A}\nb: ${B:-2}\nc: ${C:-3}\nd: $.path and $HOME stay\n"
    assert (
        entrypoint.render(text, {"A": "x", "C": "y"})
        == "a: x\nb: 2\nc: y\nd: $.path and $HOME stay\n"
    )


def test_render_names_every_missing_variable_once() -> None:
    with pytest.raises(entrypoint.MissingVariable, match=r"variables: A, B$"):
        entrypoint.render("${B} ${A} ${B} ${C:-ok}", {"A": ""})


def test_template_requires_exactly_the_backend_and_the_redis() -> None:
    names = entrypoint.PLACEHOLDER.findall(TEMPLATE.read_text())
    assert {name for name, default in names if not default} == REQUIRED


def test_template_names_no_secret_and_no_demo_tenant() -> None:
    text = TEMPLATE.read_text()
    assert "sha256:" not in text
    assert "anonymous_tenant" not in text
    assert "127.0.0.1" not in text
    # the policy's secrets are kvgate's own `env:` references, never filled in by the entrypoint
    assert set(re.findall(r"env:(\w+)", text)) == {"KVGATE_API_KEY", "KVGATE_ADMIN_TOKEN"}


def test_literal_policy_is_served_in_place(tmp_path: Path) -> None:
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1  # $.path is no placeholder\n")
    assert entrypoint.policy_to_serve(policy, {}) == policy


def test_command_follows_the_environment(tmp_path: Path) -> None:
    env = {**ENV, "KVGATE_POLICY": str(TEMPLATE), "KVGATE_PORT": "9000", "KVGATE_HOST": "::"}
    args = entrypoint.command(env)
    assert args[1:5] == ["-m", "gateway", "run", "-c"]
    assert args[6:] == ["--host", "::", "--port", "9000", "--workers", "1"]
    rendered = Path(args[5]).read_text()
    assert "url: http://gpu:8000" in rendered
    assert "url: redis://redis:6379/0" in rendered
    assert "${" not in rendered
    Path(args[5]).unlink()


def test_command_passes_the_workers_from_the_environment(tmp_path: Path) -> None:
    args = entrypoint.command({**ENV, "KVGATE_POLICY": str(TEMPLATE), "KVGATE_WORKERS": "4"})
    assert args[-2:] == ["--workers", "4"]
    Path(args[5]).unlink()


def test_main_reports_a_missing_variable(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KVGATE_POLICY", str(TEMPLATE))
        for name in REQUIRED:
            mp.delenv(name, raising=False)
        assert entrypoint.main([]) == 2
    assert "KVGATE_BACKEND_URL, KVGATE_REDIS_URL" in capsys.readouterr().err


@needs_admin_listener
@pytest.mark.parametrize("replicas", [None, "3"], ids=["defaults", "replicas-from-env"])
def test_rendered_template_is_a_valid_policy(replicas: str | None) -> None:
    env = {**ENV, **({"KVGATE_REPLICAS": replicas} if replicas else {})}
    text = entrypoint.render(TEMPLATE.read_text(), env)
    policy = compile_policy(load_text(text, "rendered"), "rendered", env)
    assert policy.spec.store.replicas == int(replicas or 1)  # type: ignore[union-attr]
    assert policy.models["llama-3.1-8b"].backends[0].url == "http://gpu:8000"
    assert set(policy.tenants) == {"default"}


@needs_admin_listener
def test_rendered_template_without_the_api_key_is_refused() -> None:
    env = {k: v for k, v in ENV.items() if k != "KVGATE_API_KEY"}
    text = entrypoint.render(TEMPLATE.read_text(), env)
    with pytest.raises(PolicyError, match="KVGATE_API_KEY is not set"):
        compile_policy(load_text(text, "rendered"), "rendered", env)


async def test_healthcheck_follows_the_port() -> None:
    async def healthz(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    async with TestServer(app, host="127.0.0.1") as server:
        # a thread: the check blocks, and the server answers on this loop
        env = {"KVGATE_PORT": str(server.port)}
        assert await asyncio.to_thread(entrypoint.healthcheck, env) == 0
    # the same port once nothing listens there
    assert entrypoint.healthcheck(env) == 1


def test_dockerfile_runs_the_entrypoint_on_the_environment() -> None:
    dockerfile = (DEPLOY.parent / "Dockerfile").read_text()
    assert "KVGATE_POLICY=/etc/kvgate/policy.yaml" in dockerfile
    assert "COPY deploy/docker/policy.yaml /etc/kvgate/policy.yaml" in dockerfile
    assert 'ENTRYPOINT ["python", "/usr/local/lib/kvgate/entrypoint.py"]' in dockerfile
    assert '"/usr/local/lib/kvgate/entrypoint.py", "--healthcheck"]' in dockerfile
    assert "8080/healthz" not in dockerfile
