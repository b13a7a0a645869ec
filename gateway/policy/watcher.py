"""Hot reload: watch the policy file (and SIGHUP), validate a new version off the event loop and
hand it over whole; a broken edit is logged once and the last good policy keeps serving.

Polling the file's (mtime, size, inode) each interval is cheap and works on every filesystem and
with editors that replace the file; a content hash skips no-op saves.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import signal
from collections.abc import Awaitable, Callable
from pathlib import Path

from gateway.errors import PolicyError
from gateway.policy.compile import Policy, compile_policy
from gateway.policy.loader import load_text, locate

log = logging.getLogger("kvgate.policy")

Apply = Callable[[Policy], Awaitable[None]]
Report = Callable[[str], None]  # "ok" | "error" | "unchanged": for the reload counter


def read_policy(path: Path) -> tuple[Policy, bytes]:
    """Load and compile ``path``; returns the policy and the digest of the text it came from."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise PolicyError(str(path), f"cannot read: {exc.strerror or exc}") from exc
    text = data.decode("utf-8", errors="replace")
    spec = load_text(text, str(path))
    try:
        policy = compile_policy(spec, str(path))
    except PolicyError as exc:
        raise locate(exc, text) from exc
    return policy, hashlib.sha256(data).digest()


class PolicyWatcher:
    def __init__(
        self, path: Path, digest: bytes, apply: Apply, report: Report, interval_s: float = 1.0
    ) -> None:
        self._path = path
        self._digest = digest
        self._apply = apply
        self._report = report
        self._interval_s = interval_s
        self._stamp = self._stat()
        self._last_error: str | None = None
        self._wake = asyncio.Event()

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
                await self.check()
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(signal.SIGHUP)

    async def check(self) -> None:
        stamp = await asyncio.to_thread(self._stat)
        if stamp is not None and stamp == self._stamp:
            return
        self._stamp = stamp
        try:
            policy, digest = await asyncio.to_thread(read_policy, self._path)
        except PolicyError as exc:
            self._report("error")
            if str(exc) != self._last_error:
                log.error("policy reload failed, the previous policy keeps serving: %s", exc)
                self._last_error = str(exc)
            return
        self._last_error = None
        if digest == self._digest:
            return
        await self._apply(policy)
        self._digest = digest
        self._report("ok")
        log.info("policy reloaded from %s, fingerprint %s", self._path, policy.fingerprint)
