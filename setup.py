"""The build is pure Python unless ``KVGATE_MYPYC=1``: then the pure core (``gateway/core``,
but ``tokens.py``) is compiled with mypyc, for about a tenth less CPU per request. The Python
sources stay the reference and ship in both builds; tests/integration/test_compiled_core.py
runs the core's and the proxy's tests against the compiled build.

    pip install mypy setuptools
    KVGATE_MYPYC=1 pip install --no-build-isolation .
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from setuptools import setup

# tokens.py subclasses RuntimeError, which mypyc cannot compile as a native class; it is not on
# the request path's hot loop either
NOT_COMPILED = {"__init__.py", "tokens.py"}


def compiled_core() -> list[Any]:
    if os.environ.get("KVGATE_MYPYC") != "1":
        return []
    from mypyc.build import mypycify

    core = Path(__file__).resolve().parent / "gateway" / "core"
    modules = sorted(
        f"gateway/core/{p.name}" for p in core.glob("*.py") if p.name not in NOT_COMPILED
    )
    return list(mypycify(modules, opt_level="3"))


setup(ext_modules=compiled_core())
