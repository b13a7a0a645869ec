"""The policy watcher against a real file: any failure is counted and logged once, the old
policy keeps serving, the watch goes on, and SIGHUP keeps a handler after the watcher stops."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import pytest

from gateway.policy.compile import Policy
from gateway.policy.watcher import PolicyWatcher, read_policy, restart_only_changes

HEAD = """version: 1
server: {port: 8080, max_body: 1MiB}
models:
  m:
    kv: {layers: 2, kv_heads: 2, head_dim: 64}
    backends: [{url: "http://127.0.0.1:1"}]
"""
GOOD = HEAD + "tenants: {a: {limits: [{unit: requests, rate: 10/s, burst: 20}]}}\n"
NAN = HEAD + "tenants: {a: {limits: [{unit: requests, rate: 10/s, burst: .nan}]}}\n"


class Recorder:
    """What the watcher handed over and reported; ``fail`` makes the next apply raise."""

    def __init__(self) -> None:
        self.applied: list[Policy] = []
        self.reports: list[str] = []
        self.fail: BaseException | None = None

    async def apply(self, policy: Policy) -> None:
        if self.fail is not None:
            failure, self.fail = self.fail, None
            raise failure
        self.applied.append(policy)

    def report(self, result: str) -> None:
        self.reports.append(result)


def _watcher(path: Path, recorder: Recorder) -> tuple[PolicyWatcher, Policy]:
    policy, digest = read_policy(path)
    watcher = PolicyWatcher(path, digest, recorder.apply, recorder.report, running=policy)
    return watcher, policy


def _edit(path: Path, text: str) -> None:
    path.write_text(text)


async def test_a_bad_number_keeps_the_old_policy_and_a_later_good_edit_applies(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD)
    recorder = Recorder()
    watcher, _ = _watcher(path, recorder)
    _edit(path, NAN)
    await watcher.check()
    watcher.request_reload()  # SIGHUP on the same broken file: counted again, logged once
    await watcher.check()
    assert recorder.reports == ["error", "error"]
    assert recorder.applied == []
    failures = [r for r in caplog.records if "reload failed" in r.getMessage()]
    assert len(failures) == 1
    assert "burst: Expected `float` > 0.0, got .nan" in failures[0].getMessage()
    _edit(path, GOOD.replace("burst: 20", "burst: 30"))
    await watcher.check()
    assert recorder.reports[-1] == "ok"
    assert recorder.applied[-1].buckets("a", "m")[0].burst == 30


async def test_an_unexpected_exception_is_survived_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD)
    recorder = Recorder()
    watcher, _ = _watcher(path, recorder)
    _edit(path, GOOD.replace("burst: 20", "burst: 25"))
    recorder.fail = RuntimeError("the store could not be built")
    await watcher.check()
    assert recorder.reports == ["error"]
    [record] = [r for r in caplog.records if "unexpectedly" in r.getMessage()]
    assert "RuntimeError: 'the store could not be built'" in record.getMessage()
    assert record.exc_info is not None
    watcher.request_reload()  # the same edit again: now it applies
    await watcher.check()
    assert recorder.reports == ["error", "ok"]
    assert recorder.applied[-1].buckets("a", "m")[0].burst == 25


async def test_cancellation_is_not_swallowed(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD)
    recorder = Recorder()
    watcher, _ = _watcher(path, recorder)
    _edit(path, GOOD.replace("burst: 20", "burst: 25"))
    recorder.fail = asyncio.CancelledError()
    with pytest.raises(asyncio.CancelledError):
        await watcher.check()


async def test_a_restart_only_change_is_applied_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD)
    recorder = Recorder()
    watcher, _ = _watcher(path, recorder)
    _edit(path, GOOD.replace("port: 8080, max_body: 1MiB", "port: 9090, max_body: 2MiB"))
    with caplog.at_level(logging.WARNING, "kvgate.policy"):
        await watcher.check()
    assert recorder.reports == ["restart_required"]
    assert len(recorder.applied) == 1
    [record] = [r for r in caplog.records if "after a restart" in r.getMessage()]
    assert "server.port 8080 -> 9090; server.max_body 1MiB -> 2MiB (larger)" in record.getMessage()


def test_restart_only_settings_are_the_listener_and_a_larger_body(tmp_path: Path) -> None:
    def policy(server: str) -> Policy:
        path = tmp_path / "p.yaml"
        path.write_text(HEAD.replace("{port: 8080, max_body: 1MiB}", server))
        return read_policy(path)[0]

    running = policy("{port: 8080, max_body: 1MiB}")
    assert restart_only_changes(running, policy("{port: 8080, max_body: 512KiB}")) == []
    assert (
        restart_only_changes(running, policy("{port: 8080, max_body: 1MiB, timeouts: {idle: 5s}}"))
        == []
    )
    assert restart_only_changes(running, policy("{host: 0.0.0.0, max_body: 1MiB}")) == [
        "server.host '127.0.0.1' -> '0.0.0.0'"
    ]


async def test_sighup_keeps_a_handler_after_the_watcher_stops(tmp_path: Path) -> None:
    path = tmp_path / "policy.yaml"
    path.write_text(GOOD)
    recorder = Recorder()
    watcher, _ = _watcher(path, recorder)
    task = asyncio.get_running_loop().create_task(watcher.run())
    await asyncio.sleep(0)
    assert signal.getsignal(signal.SIGHUP) is not signal.SIG_DFL
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # The default action would end the process: a SIGHUP during shutdown must not.
    assert signal.getsignal(signal.SIGHUP) not in (signal.SIG_DFL, None)
