"""Loading and restarts on real time scales: what kvgate does with requests sent while a real
server loads, and when the server is killed and restarted mid-stream.

python -m loadtest.bench_loading --cmd "llama-server ... --port 18200" --port 18200 \\
    --model rb-huge --signals llamacpp --kv 20,4,128,fp16 --context 2048 --out DIR

Phase ``load``: kvgate starts first, in front of nothing; then the server's ``--cmd`` starts
(t = 0) and ``--while-loading`` requests go through kvgate every ``--every`` seconds from 0.5 s
on. Phase ``restart``: with the server ready, ``--streams`` long streams start; ``--kill-after``
seconds later the server's process group is killed (SIGKILL) and started again at once, and
``--after-kill`` requests follow, ``--every`` seconds apart. Every request is recorded with its
status, ``Retry-After``, first token and end, beside the server's real time until ready (polled
on its own ``/health``). kvgate runs with its default admission but ``queue.max_wait`` and
``warmup`` from the flags (``--policy-extra`` merges more). A measurement, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import aiohttp
import msgspec
import yaml

from loadtest.bench_real import request_body, stream_chat
from loadtest.generator import PlannedRequest
from loadtest.real_report import Flavor, Record
from loadtest.real_targets import Child, GatewaySpec, kvgate, parse_kv


class Sent(msgspec.Struct, kw_only=True):
    """One request of a phase, with the server's state when it was sent."""

    phase: str
    record: Record
    ready_in_s: float | None  # real time from the send until the server was ready; None: it was


class Phase(msgspec.Struct, kw_only=True):
    name: str
    server_start_s: float  # when --cmd was (re)started, seconds from the phase's start
    ready_s: float | None  # first 200 on the server's /health
    kill_s: float | None = None
    sent: list[Sent] = []


def outcome(record: Record) -> str:
    if record.result.value == "ok":
        return "served"
    if record.status:
        return f"{record.status} {record.result.value}"
    return record.result.value


def timeline(phase: Phase) -> str:
    """A markdown table of one phase: each request's fate against the real time to ready."""
    head = f"**{phase.name}**: server (re)started at {phase.server_start_s:.1f}s, "
    head += "never ready" if phase.ready_s is None else f"ready at {phase.ready_s:.1f}s"
    if phase.kill_s is not None:
        head += f", killed at {phase.kill_s:.1f}s"
    lines = [
        head,
        "",
        "| req | sent (s) | real wait to ready (s) | outcome | Retry-After (s) "
        "| answered (s) | first token (s) | tokens |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for s in phase.sent:
        r = s.record
        cells = [
            str(r.id),
            f"{r.scheduled_s:.1f}",
            "-" if s.ready_in_s is None else f"{s.ready_in_s:.1f}",
            outcome(r) + (f" ({r.error[:40]})" if r.error and r.result.value != "ok" else ""),
            "-" if r.retry_after_s is None else f"{r.retry_after_s:g}",
            "-" if r.done_s is None else f"{r.done_s:.1f}",
            "-" if r.first_token_s is None else f"{r.first_token_s:.1f}",
            "-" if r.output_tokens is None else str(r.output_tokens),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ready_in(sent_s: float, ready_s: float | None) -> float | None:
    """Real time from a send until the server was ready: None when it was ready already,
    infinite when it never became ready in the phase."""
    if ready_s is None:
        return float("inf")
    return None if sent_s >= ready_s else ready_s - sent_s


async def watch_ready(url: str, now_s: Callable[[], float], every_s: float = 0.2) -> float:
    """The first time ``url`` answers 200."""
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1.0)) as session:
        while True:
            with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError):
                async with session.get(url) as resp:
                    if resp.status == 200:
                        return now_s()
            await asyncio.sleep(every_s)


async def _ready_within(ready: asyncio.Task[float], timeout_s: float) -> float | None:
    """When the server became ready, waiting for it (every request may have ended before);
    None if it did not within ``timeout_s``."""
    try:
        return await asyncio.wait_for(ready, max(0.0, timeout_s))
    except TimeoutError:
        return None


class Loading:
    def __init__(self, args: argparse.Namespace, out: Path) -> None:
        self.args, self.out = args, out
        self.server = f"http://127.0.0.1:{args.port}"
        self.next_id = 0

    def item(self, at_s: float, output_tokens: int) -> PlannedRequest:
        self.next_id += 1
        a = self.args
        return PlannedRequest(
            id=self.next_id,
            tenant="bench",
            at_s=at_s,
            prompt_tokens=a.prompt_tokens,
            output_tokens=output_tokens,
            max_tokens=output_tokens,
            stream=True,
        )

    async def fire(
        self,
        session: aiohttp.ClientSession,
        gateway: str,
        items: Sequence[PlannedRequest],
        t0: float,
        now_s: Callable[[], float],
    ) -> list[Record]:
        loop = asyncio.get_running_loop()
        records = [Record(id=i.id, scheduled_s=i.at_s) for i in items]

        async def one(item: PlannedRequest, record: Record) -> None:
            await asyncio.sleep(max(0.0, t0 + item.at_s - loop.time()))
            record.scheduled_s = now_s()
            body = request_body(
                item, self.args.model, self.args.chars_per_token, f"load {item.id}", True
            )
            await stream_chat(session, gateway, body, record, now_s)

        await asyncio.gather(*(one(i, r) for i, r in zip(items, records, strict=True)))
        return records

    async def start_server(self, tag: str) -> Child:
        return await Child.shell(f"server ({tag})", self.args.cmd, self.out / f"server-{tag}.log")

    async def load_phase(self, gateway: str, session: aiohttp.ClientSession) -> tuple[Phase, Child]:
        a = self.args
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        def now_s() -> float:
            return loop.time() - t0

        server = await self.start_server("load")
        ready = asyncio.create_task(watch_ready(self.server + "/health", now_s))
        items = [self.item(0.5 + i * a.every, a.output_tokens) for i in range(a.while_loading)]
        records = await asyncio.wait_for(
            self.fire(session, gateway, items, t0, now_s), a.phase_timeout
        )
        ready_s = await _ready_within(ready, a.phase_timeout - now_s())
        phase = Phase(name="load", server_start_s=0.0, ready_s=ready_s)
        phase.sent = [
            Sent(phase="load", record=r, ready_in_s=ready_in(r.scheduled_s, ready_s))
            for r in records
        ]
        return phase, server

    async def restart_phase(
        self, gateway: str, session: aiohttp.ClientSession, server: Child
    ) -> tuple[Phase, Child]:
        a = self.args
        loop = asyncio.get_running_loop()
        t0 = loop.time()

        def now_s() -> float:
            return loop.time() - t0

        streams = [self.item(0.0, a.stream_tokens) for _ in range(a.streams)]
        kill_s = a.kill_after
        after = [
            self.item(kill_s + 0.5 + i * a.every, a.output_tokens) for i in range(a.after_kill)
        ]
        firing = asyncio.create_task(self.fire(session, gateway, streams + after, t0, now_s))
        await asyncio.sleep(max(0.0, t0 + kill_s - loop.time()))
        server.signal(signal.SIGKILL)
        await server.proc.wait()
        start_s = now_s()
        server = await self.start_server("restart")
        ready = asyncio.create_task(watch_ready(self.server + "/health", now_s))
        records = await asyncio.wait_for(firing, a.phase_timeout)
        ready_s = await _ready_within(ready, a.phase_timeout - now_s())
        phase = Phase(name="restart", server_start_s=start_s, ready_s=ready_s, kill_s=kill_s)
        phase.sent = [
            Sent(
                phase="restart",
                record=r,
                ready_in_s=None if r.scheduled_s < kill_s else ready_in(r.scheduled_s, ready_s),
            )
            for r in records
        ]
        return phase, server

    def gateway_spec(self) -> GatewaySpec:
        a = self.args
        extra: dict[str, object] = {}
        if a.policy_extra:
            loaded = yaml.safe_load(Path(a.policy_extra).read_text(encoding="utf-8"))
            extra = loaded if isinstance(loaded, dict) else {}
        flavor: Flavor = a.signals
        return GatewaySpec(
            model=a.model,
            kv=parse_kv(a.kv),
            context=a.context,
            chars_per_token=a.chars_per_token,
            signals=flavor,
            warmup=a.warmup,
            probe_interval=a.probe_interval,
            max_wait=a.max_wait,
            extra=extra,
        )


async def main_async(args: argparse.Namespace, out: Path) -> int:
    bench = Loading(args, out)
    phases: list[Phase] = []
    server: Child | None = None
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10.0)
    try:
        async with (
            kvgate(bench.gateway_spec(), bench.server, out, wait_ready=False) as gateway,
            aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), timeout=timeout
            ) as session,
        ):
            phase, server = await bench.load_phase(gateway, session)
            phases.append(phase)
            print(timeline(phase), flush=True)
            if args.streams or args.after_kill:
                if phase.ready_s is None:
                    raise RuntimeError("the server never became ready; no restart phase")
                phase, server = await bench.restart_phase(gateway, session, server)
                phases.append(phase)
                print("\n" + timeline(phase), flush=True)
    finally:
        if server is not None:
            await server.stop()
        (out / "loading.json").write_bytes(msgspec.json.format(msgspec.json.encode(phases)))
        (out / "loading.md").write_text(
            "\n\n".join(timeline(p) for p in phases) + "\n", encoding="utf-8"
        )
    return 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m loadtest.bench_loading", description=__doc__.splitlines()[0]
    )
    p.add_argument("--cmd", required=True, help="starts the server on 127.0.0.1:--port")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--model", required=True, help="the served model name")
    p.add_argument("--signals", choices=("vllm", "llamacpp"), default="vllm")
    p.add_argument("--kv", required=True, help="layers,kv_heads,head_dim[,dtype]")
    p.add_argument("--context", type=int, required=True)
    p.add_argument("--chars-per-token", type=float, default=4.0)
    p.add_argument("--prompt-tokens", type=int, default=200)
    p.add_argument("--output-tokens", type=int, default=32)
    p.add_argument("--while-loading", type=int, default=4, help="requests sent while loading")
    p.add_argument("--every", type=float, default=2.0, help="seconds between those requests")
    p.add_argument("--streams", type=int, default=2, help="streams in flight at the kill")
    p.add_argument("--stream-tokens", type=int, default=400)
    p.add_argument("--kill-after", type=float, default=4.0, help="seconds into the restart phase")
    p.add_argument("--after-kill", type=int, default=3, help="requests sent after the kill")
    p.add_argument("--max-wait", default="120s")
    p.add_argument("--warmup", default="60s", help="the backend's warmup (kvgate's default)")
    p.add_argument("--probe-interval", default="1s")
    p.add_argument("--policy-extra", default=None, help="YAML deep-merged into kvgate's policy")
    p.add_argument("--phase-timeout", type=float, default=400.0)
    p.add_argument("--out", required=True)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    code = asyncio.run(main_async(args, out))
    print(f"\n({time.monotonic() - started:.0f}s)", file=sys.stderr)
    return code


if __name__ == "__main__":
    sys.exit(main())
