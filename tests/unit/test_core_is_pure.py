"""gateway.core holds the decisions; it must stay free of I/O so it runs with a fake clock."""

from __future__ import annotations

import pkgutil
import subprocess
import sys

import gateway.core

IO_MODULES = ("asyncio", "aiohttp", "redis", "prometheus_client", "uvloop", "socket")


def test_core_imports_no_io_library() -> None:
    modules = [f"gateway.core.{m.name}" for m in pkgutil.iter_modules(gateway.core.__path__)]
    code = (
        "import importlib, sys\n"
        f"for name in {modules!r}: importlib.import_module(name)\n"
        f"print(','.join(m for m in {IO_MODULES!r} if m in sys.modules))\n"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert len(modules) >= 10
    assert loaded == ""
