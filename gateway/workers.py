"""``kvgate run --workers N``: N worker processes on one port, a supervisor, one /metrics.

The supervisor forks the workers before any event loop exists; each one binds the public port
with SO_REUSEPORT (the kernel spreads connections over them) and serves the whole gateway.
A worker that dies is started again (after a pause that doubles while they keep dying, up to
``MAX_RESTART_PAUSE_S``); on SIGTERM or SIGINT the supervisor sends SIGTERM to every worker,
which drains as one process does (``server.grace_period``), and kills what is left after it.
SIGHUP is passed on to every worker (each one reloads the policy, as one process does).
A worker is tied to its supervisor's life: when the supervisor dies, even by SIGKILL (which it
cannot pass on), each worker gets SIGTERM and drains (``prctl(PR_SET_PDEATHSIG)`` on Linux; a
thread watching ``getppid`` elsewhere), so no orphan keeps the port.

Metrics: each worker also serves its own exposition on a Unix socket in a private directory,
and a worker answering the public /metrics gathers every worker's and merges them
(``merge_expositions``): one page for the process group, each sample with a ``worker`` label
(counters of a restarted worker start again from zero, which Prometheus' ``rate`` handles).

Sharing: with a Redis store the buckets are shared and, with ``admission.shared``, so is what is
in flight on each backend. With the in-memory store each worker plans ``1/N`` of every limit and
every backend (the rule ``store.replicas`` applies to replicas under ``on_error: local``), so the
group together stays within the policy; requests are spread by the kernel, not by tenant, so one
tenant's burst may meet one worker's share of its limit first.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import aiohttp

_log = logging.getLogger("kvgate")

MAX_RESTART_PAUSE_S = 10.0
_SCRAPE_TIMEOUT_S = 2.0
_PARENT_POLL_S = 0.5  # how soon a worker without PR_SET_PDEATHSIG sees its supervisor gone
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def merge_expositions(pages: list[tuple[str, str]]) -> str:
    """One Prometheus text page from (worker, page) pairs: each family once, with every
    worker's samples under it, labelled ``worker``."""
    heads: dict[str, list[str]] = {}
    samples: dict[str, list[str]] = {}
    for worker, page in pages:
        family = ""
        for line in page.splitlines():
            if not line:
                continue
            if line.startswith("#"):
                parts = line.split(" ", 3)
                if len(parts) >= 3 and parts[1] in ("HELP", "TYPE"):
                    family = parts[2]
                    heads.setdefault(family, [])
                    samples.setdefault(family, [])
                    if not any(h.split(" ", 3)[1] == parts[1] for h in heads[family]):
                        heads[family].append(line)
                continue
            samples.setdefault(family, []).append(_labelled(line, worker))
    out: list[str] = []
    for family, lines in samples.items():
        out += heads.get(family, [])
        out += lines
    return "\n".join(out) + "\n"


def _labelled(sample: str, worker: str) -> str:
    label = f'worker="{worker}"'
    name_end = len(sample)
    for i, ch in enumerate(sample):
        if ch in "{ ":
            name_end = i
            break
    name, rest = sample[:name_end], sample[name_end:]
    if rest.startswith("{}"):
        return f"{name}{{{label}}}{rest[2:]}"
    if rest.startswith("{"):
        return f"{name}{{{label},{rest[1:]}"
    return f"{name}{{{label}}}{rest}"


class Group:
    """A worker's view of its process group: where every worker serves its own metrics, state
    and reload (``gateway.admin.worker_app``, on a Unix socket in the group's directory)."""

    def __init__(self, directory: Path, index: int, workers: int) -> None:
        self.directory = directory
        self.index = index
        self.workers = workers

    def socket_of(self, index: int) -> Path:
        return self.directory / f"worker-{index}.sock"

    async def metrics(self, own: str) -> str:
        """Every live worker's page merged; this worker's is ``own``."""
        pages = await self.gather("GET", "/metrics", own)
        found = [(w, p) for w, p in pages.items() if p is not None]
        return merge_expositions(found)

    async def gather(
        self, method: str, path: str, own: str, timeout_s: float = _SCRAPE_TIMEOUT_S
    ) -> dict[str, str | None]:
        """Every worker's answer to ``method path`` on its socket, by worker index in order;
        this worker's is ``own``, and one that did not answer (restarting, or stuck for
        ``timeout_s``) None."""
        others = [i for i in range(self.workers) if i != self.index]
        answers = await asyncio.gather(*(self._ask(i, method, path, timeout_s) for i in others))
        found: dict[int, str | None] = dict(zip(others, answers, strict=True))
        found[self.index] = own
        return {str(i): found[i] for i in sorted(found)}

    async def _ask(self, index: int, method: str, path: str, timeout_s: float) -> str | None:
        socket_path = self.socket_of(index)
        if not socket_path.exists():
            return None  # restarting
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        try:
            async with (
                aiohttp.ClientSession(
                    connector=aiohttp.UnixConnector(path=str(socket_path)), timeout=timeout
                ) as session,
                session.request(method, f"http://worker{path}") as resp,
            ):
                return await resp.text()
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None


def supervise(workers: int, run_worker: Callable[[int], None], grace_s: float) -> int:
    """Fork ``workers`` processes running ``run_worker(index)``; keep them up until SIGTERM or
    SIGINT, then stop them within ``grace_s`` (plus a margin) and return 0."""
    stopping = False

    def stop(signum: int, frame: object) -> None:
        nonlocal stopping
        stopping = True

    pids: dict[int, int] = {}  # pid -> worker index

    def reload(signum: int, frame: object) -> None:
        for pid in list(pids):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGHUP)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    # SIGHUP's default action would end the supervisor and leave its workers running
    signal.signal(signal.SIGHUP, reload)
    pause = dict.fromkeys(range(workers), 0.5)
    due: dict[int, float] = dict.fromkeys(range(workers), 0.0)  # index -> when to (re)start
    while not stopping:
        now = time.monotonic()
        for index, at in list(due.items()):
            if at <= now:
                del due[index]
                pids[_fork(index, run_worker)] = index
        with contextlib.suppress(ChildProcessError, InterruptedError):
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid and pid in pids:
                index = pids.pop(pid)
                _log.warning(
                    "worker %d (pid %d) died (%s); restarting it in %.1fs",
                    index,
                    pid,
                    _describe(status),
                    pause[index],
                )
                due[index] = time.monotonic() + pause[index]
                pause[index] = min(MAX_RESTART_PAUSE_S, 2 * pause[index])
                continue
        time.sleep(0.1)
    _log.info("stopping %d workers", len(pids))
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s + 5.0
    while pids and time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError, InterruptedError):
            pid, _ = os.waitpid(-1, os.WNOHANG)
            if pid:
                pids.pop(pid, None)
                continue
        time.sleep(0.05)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
    return 0


def _fork(index: int, run_worker: Callable[[int], None]) -> int:
    supervisor = os.getpid()
    pid = os.fork()
    if pid:
        return pid
    code = 0
    try:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGHUP, signal.SIG_DFL)  # until its policy watcher takes it
        tie_to_parent(supervisor)
        run_worker(index)
    except BaseException:
        _log.exception("worker %d failed", index)
        code = 1
    finally:
        os._exit(code)


def tie_to_parent(parent: int, *, kernel: bool = True) -> None:
    """Have this process get SIGTERM when ``parent`` (the process that forked it) dies.

    On Linux the kernel sends it (``PR_SET_PDEATHSIG``); the parent may have died before that
    was set, so ``getppid`` is checked after. Elsewhere a daemon thread polls ``getppid``: an
    orphan is reparented, so a changed parent pid means the supervisor is gone (``kernel``
    False: that way on Linux too)."""
    if kernel and sys.platform == "linux" and _set_pdeathsig(signal.SIGTERM):
        if os.getppid() != parent:
            os.kill(os.getpid(), signal.SIGTERM)
        return

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(_PARENT_POLL_S)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="kvgate-parent-watch", daemon=True).start()


def _set_pdeathsig(signum: int) -> bool:
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # the process's own symbols include libc's
        return int(libc.prctl(_PR_SET_PDEATHSIG, int(signum), 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def _describe(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"signal {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit {os.waitstatus_to_exitcode(status)}"
