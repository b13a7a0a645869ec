"""Hot reload: watch the policy file (and SIGHUP), validate a new version off the event loop and
hand it over whole; a broken edit is logged once and the last good policy keeps serving.

Polling the file's (mtime, size, inode) each interval is cheap and works on every filesystem and
with editors that replace the file; a content hash skips no-op saves. Nothing a reload raises
stops the watcher: a failure of any kind is counted, logged once, and the watch goes on.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path

from gateway.errors import PolicyError
from gateway.policy import loader, units
from gateway.policy.compile import Policy, compile_policy

log = logging.getLogger("kvgate.policy")

Apply = Callable[[Policy], Awaitable[None]]
# "ok" | "error" | "restart_required" (applied, but some settings wait for a restart)
Report = Callable[[str], None]


class OfflineSecrets(Mapping[str, str]):
    """Stands in for the environment when a policy is checked without its secrets (CI): every
    ``env:`` reference resolves to a placeholder of its own name, so two tenants naming the
    same variable still collide, and nothing real is read."""

    def __getitem__(self, name: str) -> str:
        return f"offline-placeholder:{name}"

    def __iter__(self) -> Iterator[str]:
        return iter(())

    def __len__(self) -> int:
        return 0


def read_policy(path: Path, *, offline: bool = False) -> tuple[Policy, bytes]:
    """Load and compile ``path``; returns the policy and the digest of the text it came from.
    ``offline`` checks ``env:`` references without reading them."""
    data = loader.read_source(path)
    document = loader.parse(loader.decode_text(data, str(path)), str(path))
    env = OfflineSecrets() if offline else None
    try:
        with loader.collector_paused():  # compiling a large policy allocates as much again
            policy = compile_policy(document.spec, str(path), env=env)
    except PolicyError as exc:
        raise document.locate(exc) from exc
    return policy, hashlib.sha256(data).digest()


def restart_only_changes(running: Policy, new: Policy) -> list[str]:
    """Settings of ``new`` that a reload cannot apply: the listener and what was fixed when the
    server started. A smaller ``max_body`` is enforced per request, so only a larger one waits."""
    old, now = running.spec.server, new.spec.server
    changes = [
        f"server.{name} {units.excerpt(getattr(old, name))} -> {units.excerpt(getattr(now, name))}"
        for name in ("host", "port", "grace_period", "access_log")
        if getattr(old, name) != getattr(now, name)
    ]
    for name in ("host", "port"):
        if getattr(old.admin, name) != getattr(now.admin, name):
            was, new_value = getattr(old.admin, name), getattr(now.admin, name)
            changes.append(f"server.admin.{name} {was} -> {new_value}")
    if new.server.max_body_bytes > running.server.max_body_bytes:
        changes.append(f"server.max_body {old.max_body} -> {now.max_body} (larger)")
    return changes


class PolicyWatcher:
    def __init__(
        self,
        path: Path,
        digest: bytes,
        apply: Apply,
        report: Report,
        interval_s: float = 1.0,
        *,
        running: Policy | None = None,
    ) -> None:
        """``running`` is the policy the process started with: a reload that changes one of its
        restart-only settings says so (without it, nothing is compared)."""
        self._path = path
        self._digest = digest
        self._apply = apply
        self._report = report
        self._interval_s = interval_s
        self._running = running
        self._stamp = self._stat()
        self._last_error: str | None = None
        self._wake = asyncio.Event()
        self._checking = asyncio.Lock()  # one look at a time: a reload and the watch's own

    def _stat(self) -> tuple[int, int, int] | None:
        try:
            st = self._path.stat()
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size, st.st_ino)

    def request_reload(self) -> None:
        """Reload now (SIGHUP), even if the file's stamp did not change."""
        self._stamp = None
        self._wake.set()

    async def reload(self) -> tuple[str, str | None]:
        """Reload now, even if the file's stamp did not change, and answer the outcome: "ok",
        "restart_required", "unchanged" (the file holds the serving policy) or "error" (the
        previous policy keeps serving), with the error's message."""
        self._stamp = None
        async with self._checking:
            outcome = await self.check()
        return outcome, self._last_error if outcome == "error" else None

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        try:
            while True:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._interval_s):
                        await self._wake.wait()
                self._wake.clear()
                async with self._checking:
                    await self.check()
        finally:
            # Removing the handler would restore SIGHUP's default action, and a `kill -HUP`
            # during the shutdown drain would end the process with requests in flight.
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(signal.SIGHUP, _ignore_sighup)

    async def check(self) -> str:
        """One look at the file; its outcome (``reload``'s, "unchanged" also when the file's
        stamp is); never raises (but lets cancellation through)."""
        try:
            return await self._check()
        except PolicyError as exc:
            self._failed(str(exc), None)
        except Exception as exc:  # any failure keeps the old policy serving
            self._failed(f"{self._path}: {type(exc).__name__}: {units.excerpt(str(exc))}", exc)
        return "error"

    async def _check(self) -> str:
        stamp = await asyncio.to_thread(self._stat)
        if stamp is not None and stamp == self._stamp:
            return "unchanged"
        self._stamp = stamp
        policy, digest = await asyncio.to_thread(read_policy, self._path)
        if digest == self._digest:
            self._last_error = None
            return "unchanged"
        await self._apply(policy)
        self._digest = digest
        self._last_error = None
        pending = restart_only_changes(self._running, policy) if self._running else []
        if pending:
            self._report("restart_required")
            log.warning(
                "policy reloaded from %s, fingerprint %s; these take effect only after a "
                "restart: %s",
                self._path,
                policy.fingerprint,
                "; ".join(pending),
            )
            return "restart_required"
        self._report("ok")
        log.info("policy reloaded from %s, fingerprint %s", self._path, policy.fingerprint)
        return "ok"

    def _failed(self, message: str, exc: Exception | None) -> None:
        try:
            self._report("error")
        except Exception:  # a broken counter must not stop the watch
            log.exception("the policy reload counter failed")
        if message == self._last_error:
            return
        self._last_error = message
        if exc is None:
            log.error("policy reload failed, the previous policy keeps serving: %s", message)
        else:
            log.error(
                "policy reload failed unexpectedly, the previous policy keeps serving: %s",
                message,
                exc_info=exc,
            )


def _ignore_sighup() -> None:
    log.info("SIGHUP ignored: the gateway is shutting down")
