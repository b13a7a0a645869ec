"""What the deployment-kit tests share: where the kit is, the tools that check it, and the
entrypoint module (it is a script in the image, not part of the ``gateway`` package)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import msgspec
import pytest

from gateway.policy import schema

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
TEMPLATE = DEPLOY / "docker" / "policy.yaml"

# The kit is written to the admin listener's contract (issue 14, item 1): a gateway without
# `server.admin` refuses its policies, so the tests that run them wait for it.
ADMIN_LISTENER = "admin" in {f.name for f in msgspec.structs.fields(schema.Server)}
needs_admin_listener = pytest.mark.skipif(
    not ADMIN_LISTENER, reason="this gateway has no admin listener (`server.admin`) yet"
)


def require_tool(name: str, install: str) -> str:
    """The path of command ``name``; missing: skip, except under ``CI``, which installs it."""
    path = shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))
    if path is None:
        message = f"{name} is not installed ({install})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path


def promtool() -> str:
    return require_tool("promtool", "apt-get install -y prometheus")


def load_entrypoint() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "kvgate_entrypoint", DEPLOY / "docker" / "entrypoint.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
