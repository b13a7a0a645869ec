"""The pure core compiled with mypyc (optional: pure Python stays the reference) imports and
passes the core's unit tests. The tree is copied, compiled there, and tested there, so this
checkout keeps importing the Python sources.

    mypyc $(ls gateway/core/*.py | grep -v -e __init__ -e tokens.py)   # the build it checks
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
# tokens.py subclasses RuntimeError, which mypyc cannot compile as a native class; it is not
# on the request path's hot loop either
NOT_COMPILED = {"__init__.py", "tokens.py"}
CORE_TESTS = [
    "tests/unit/test_admission.py",
    "tests/unit/test_backend_state.py",
    "tests/unit/test_capacity.py",
    "tests/unit/test_queueing.py",
    "tests/unit/test_bucket.py",
    "tests/unit/test_bucket_properties.py",
    "tests/unit/test_adaptive.py",
    "tests/unit/test_outputs.py",
    "tests/unit/test_cost.py",
    "tests/unit/test_shared_admission.py",
]


def test_the_mypyc_build_of_the_core_passes_the_core_tests(tmp_path: Path) -> None:
    pytest.importorskip("mypyc")
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    for part in ("gateway", "tests", "loadtest", "policies", "pyproject.toml"):
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, tmp_path / part)
    modules = sorted(
        str(p.relative_to(tmp_path))
        for p in (tmp_path / "gateway" / "core").glob("*.py")
        if p.name not in NOT_COMPILED
    )
    build = subprocess.run(
        [sys.executable, "-m", "mypyc", *modules],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    probe = (
        "import gateway.core.admission as a, gateway.core.bucket as b; "
        "print(a.__file__, b.__file__)"
    )
    where = subprocess.run(
        [sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, check=True
    )
    assert all(f.endswith(".so") for f in where.stdout.split()), where.stdout
    tests = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *CORE_TESTS],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert tests.returncode == 0, tests.stdout[-3000:]
