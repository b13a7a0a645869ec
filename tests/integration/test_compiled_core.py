"""The pure core compiled with mypyc (the opt-in build of setup.py; pure Python stays the
reference) imports and passes the core's unit tests and the proxy's tests. The tree is copied,
compiled there, and tested there, so this checkout keeps importing the Python sources.

    KVGATE_MYPYC=1 python setup.py build_ext --inplace   # the build it checks
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
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
    "tests/unit/test_prefixes.py",
    # the request path on the compiled core, end to end
    "tests/integration/test_proxy.py",
    "tests/integration/test_endpoints.py",
    "tests/integration/test_admit.py",
]


def test_the_mypyc_build_of_the_core_passes_the_core_tests(tmp_path: Path) -> None:
    pytest.importorskip("mypyc")
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    for part in ("gateway", "tests", "loadtest", "policies", "pyproject.toml", "setup.py"):
        src = ROOT / part
        if src.is_dir():
            shutil.copytree(src, tmp_path / part, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(src, tmp_path / part)
    build = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=tmp_path,
        env={**os.environ, "KVGATE_MYPYC": "1"},
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
