"""The container's entrypoint: run kvgate on the policy, port and host the environment names, and
answer the image's health check on that same port.

``KVGATE_POLICY`` (default /etc/kvgate/policy.yaml), ``KVGATE_HOST`` (0.0.0.0) and ``KVGATE_PORT``
(8080) say what ``kvgate run`` serves; ``KVGATE_WORKERS`` (1) how many worker processes share
its ports (``--workers``: explicit here, where kvgate alone would run one per core it sees, and a
container's CPU limit is not what it sees). A policy holding ``${NAME}`` or ``${NAME:-default}``
placeholders is filled from the environment into a private copy first (the shipped example is such
a template), since the policy language reads only secrets (``env:``) from the environment; a file
without placeholders is served as it is, so kvgate hot-reloads it when it changes.

``entrypoint.py --healthcheck`` exits 0 when ``/healthz`` answers 200 on ``KVGATE_PORT``.
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import urllib.request
from collections.abc import Mapping
from pathlib import Path

DEFAULT_POLICY = "/etc/kvgate/policy.yaml"
PLACEHOLDER = re.compile(r"\$\{([A-Z_][A-Z0-9_]*)(?::-([^}]*))?\}")


class MissingVariable(Exception):
    pass


def render(text: str, env: Mapping[str, str]) -> str:
    """``text`` with each placeholder replaced by its variable, else by its default; every
    placeholder with neither is named in one error."""
    missing: list[str] = []

    def value(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        found = env.get(name) or default
        if found is None:
            missing.append(name)
            return ""
        return found

    rendered = PLACEHOLDER.sub(value, text)
    if missing:
        names = ", ".join(sorted(set(missing)))
        raise MissingVariable(f"the policy needs these environment variables: {names}")
    return rendered


def policy_to_serve(path: Path, env: Mapping[str, str]) -> Path:
    """``path`` itself, or a rendered copy of it when it is a template."""
    text = path.read_text(encoding="utf-8")
    if PLACEHOLDER.search(text) is None:
        return path
    rendered = render(text, env)
    fd, name = tempfile.mkstemp(prefix="kvgate-policy-", suffix=".yaml")
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(rendered)
    return Path(name)


def command(env: Mapping[str, str]) -> list[str]:
    policy = policy_to_serve(Path(env.get("KVGATE_POLICY") or DEFAULT_POLICY), env)
    host = env.get("KVGATE_HOST") or "0.0.0.0"
    port = env.get("KVGATE_PORT") or "8080"
    workers = env.get("KVGATE_WORKERS") or "1"
    return [
        sys.executable,
        "-m",
        "gateway",
        "run",
        "-c",
        str(policy),
        "--host",
        host,
        "--port",
        port,
        "--workers",
        workers,
    ]


def healthcheck(env: Mapping[str, str]) -> int:
    url = f"http://127.0.0.1:{env.get('KVGATE_PORT') or '8080'}/healthz"
    try:
        with urllib.request.urlopen(url, timeout=2) as answer:
            return 0 if answer.status == 200 else 1
    except OSError as exc:
        print(f"kvgate healthcheck: {url}: {exc}", file=sys.stderr)
        return 1


def main(argv: list[str]) -> int:
    if argv == ["--healthcheck"]:
        return healthcheck(os.environ)
    if argv:
        print("usage: entrypoint.py [--healthcheck]", file=sys.stderr)
        return 2
    try:
        args = command(os.environ)
    except (OSError, MissingVariable) as exc:
        print(f"kvgate: {exc}", file=sys.stderr)
        return 2
    os.execv(args[0], args)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
