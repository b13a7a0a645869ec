"""The open-loop generator: a seeded trace drawn up front (``plan``), then fired at its scheduled
times whatever the responses (``run_trace``), each request recorded as a ``RequestRecord``.

Bounds: at most ``scenario.max_requests`` requests; the run ends ``duration_s + drain_timeout_s``
after it starts, cutting whatever is still in flight (recorded as ``unfinished``); loopback targets
only. The chat prompt is text whose token count, by the simulator's rule
(ceil(chars / chars_per_token) + 4 per message + 3), is what the trace drew: one user message
unique to the request, after the tenant's shared system prompt when it has one.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import ipaddress
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Mapping, Sequence
from typing import TextIO
from urllib.parse import urlsplit

import aiohttp
import msgspec

from gateway.sim.wire import ChatRequest, prompt_block_hashes
from loadtest.records import RequestRecord, Result
from loadtest.scenario import RetrySpec, Scenario

PROMPT_OVERHEAD_TOKENS = 4 + 3  # one message, plus the reply primer
MIN_PROMPT_TOKENS = PROMPT_OVERHEAD_TOKENS + 1
SYSTEM_OVERHEAD_TOKENS = 4  # the system message's framing
_FILLER = "the quick brown fox jumps over the lazy dog while the kv cache fills up slowly "


class PlannedRequest(msgspec.Struct, kw_only=True, frozen=True):
    id: int
    tenant: str
    at_s: float  # scheduled send time, seconds from the start of the run
    prompt_tokens: int
    output_tokens: int  # real output length, sent as sim_output_tokens; <= max_tokens
    max_tokens: int
    stream: bool
    shared_prefix_tokens: int = 0  # of prompt_tokens, the tenant's system prompt (framing included)
    prefix: int = 0  # which of the tenant's system prompts


class TraceTooLarge(ValueError):
    """The drawn trace has more requests than the scenario's max_requests allows."""


def plan(scenario: Scenario) -> list[PlannedRequest]:
    """Draw the whole trace from the scenario's seed. Each tenant has its own random streams for
    arrivals and sizes, so editing one tenant or one distribution leaves the rest of the trace
    as it was."""
    drawn: list[tuple[float, str, int, int, int, bool, int]] = []
    duration_s = scenario.duration_s
    for name, tenant in scenario.tenants.items():
        arrivals_rng = random.Random(f"{scenario.seed}/{name}/arrivals")
        sizes_rng = random.Random(f"{scenario.seed}/{name}/sizes")
        prefix_rng = random.Random(f"{scenario.seed}/{name}/prefixes")
        times = sorted(
            t for arrivals in tenant.arrivals for t in arrivals.times(arrivals_rng, duration_s)
        )
        for t in times:
            prompt = max(MIN_PROMPT_TOKENS, tenant.prompt_tokens.draw(sizes_rng))
            prompt += tenant.shared_prefix_tokens
            max_tokens = tenant.max_tokens.draw(sizes_rng)
            output = min(max_tokens, tenant.output_tokens.draw(sizes_rng))
            stream = sizes_rng.random() < tenant.stream_share
            prefix = prefix_rng.randrange(tenant.shared_prefixes)
            drawn.append((t, name, prompt, output, max_tokens, stream, prefix))
    if len(drawn) > scenario.max_requests:
        raise TraceTooLarge(
            f"scenario {scenario.name!r} draws {len(drawn)} requests, over its max_requests "
            f"({scenario.max_requests})"
        )
    drawn.sort(key=lambda d: (d[0], d[1]))
    shared = {name: tenant.shared_prefix_tokens for name, tenant in scenario.tenants.items()}
    return [
        PlannedRequest(
            id=i,
            tenant=name,
            at_s=t,
            prompt_tokens=p,
            output_tokens=o,
            max_tokens=m,
            stream=s,
            shared_prefix_tokens=shared[name],
            prefix=k if shared[name] else 0,
        )
        for i, (t, name, p, o, m, s, k) in enumerate(drawn)
    ]


def _filled(content_tokens: int, chars_per_token: float, head: str) -> str:
    """``head`` then filler, cut to the length the simulator counts as ``content_tokens``."""
    chars = math.floor(content_tokens * chars_per_token)
    # Float division can land one token off either way; settle on the counter's own formula.
    while math.ceil(chars / chars_per_token) > content_tokens:
        chars -= 1
    while math.ceil(chars / chars_per_token) < content_tokens:
        chars += 1
    body = head + _FILLER * (chars // len(_FILLER) + 1)
    return body[:chars]


def prompt_text(prompt_tokens: int, chars_per_token: float, request_id: int) -> str:
    """Text of one user message that counts as ``prompt_tokens`` in total (message overhead
    included). Needs chars_per_token >= 1 and prompt_tokens >= MIN_PROMPT_TOKENS."""
    if chars_per_token < 1.0 or prompt_tokens < MIN_PROMPT_TOKENS:
        raise ValueError("need chars_per_token >= 1 and prompt_tokens >= MIN_PROMPT_TOKENS")
    content_tokens = prompt_tokens - PROMPT_OVERHEAD_TOKENS
    return _filled(content_tokens, chars_per_token, f"[request {request_id}] ")


def system_text(tokens: int, chars_per_token: float, tenant: str, prefix: int) -> str:
    """Text of the system message that counts as ``tokens`` (its framing included): the same
    for every request of ``tenant`` choosing system prompt number ``prefix``."""
    if chars_per_token < 1.0 or tokens <= SYSTEM_OVERHEAD_TOKENS:
        raise ValueError("need chars_per_token >= 1 and tokens > SYSTEM_OVERHEAD_TOKENS")
    head = f"[system prompt {prefix} of tenant {tenant!r}] "
    return _filled(tokens - SYSTEM_OVERHEAD_TOKENS, chars_per_token, head)


def chat_messages(item: PlannedRequest, chars_per_token: float) -> list[dict[str, str]]:
    """The messages of ``item``'s request: its tenant's system prompt, if any, then its own."""
    own = item.prompt_tokens - item.shared_prefix_tokens
    user = {"role": "user", "content": prompt_text(own, chars_per_token, item.id)}
    if not item.shared_prefix_tokens:
        return [user]
    text = system_text(item.shared_prefix_tokens, chars_per_token, item.tenant, item.prefix)
    return [{"role": "system", "content": text}, user]


def block_hashes(scenario: Scenario, item: PlannedRequest) -> tuple[int, ...] | None:
    """The prompt block hashes the scenario's simulator derives from ``item``'s request (None
    when it does not cache prefixes): for the yardsticks, which run the engine without HTTP."""
    cfg = scenario.backend
    if not cfg.prefix_caching:
        return None
    messages = chat_messages(item, cfg.chars_per_token)
    req = msgspec.convert({"model": scenario.model, "messages": messages}, ChatRequest)
    return prompt_block_hashes(req, cfg.chars_per_token, cfg.block_size)


def check_loopback(url: str) -> None:
    """Refuse any target that is not on this machine's loopback interface."""
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"refusing non-loopback target {url!r}: load tests run on 127.0.0.1 only")


# --- one HTTP attempt -----------------------------------------------------------------------


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None


class _Error(msgspec.Struct):
    message: str = ""
    type: str | None = None
    code: str | int | None = None


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    delta: _Delta | None = None


class _Chunk(msgspec.Struct):
    """The fields we read from a response body or one stream event; the rest is ignored."""

    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: _Error | None = None


_chunk = msgspec.json.Decoder(_Chunk)


class Attempt(msgspec.Struct, kw_only=True, frozen=True):
    status: int  # 0 when no response arrived
    result: Result
    done_s: float
    error_type: str | None = None
    first_token_s: float | None = None
    prompt_tokens: int | None = None
    output_tokens: int | None = None
    retry_after_s: float | None = None
    should_retry: bool | None = None  # x-should-retry, when the server sent it


def classify(status: int, error: _Error | None) -> Result:
    words = " ".join(str(w) for w in (error.type, error.code, error.message) if w) if error else ""
    if "oom" in words.lower().split() or "out of memory" in words.lower():
        return Result.OOM
    if status == 429:
        return Result.RATE_LIMITED
    if status == 503:
        return Result.SHED
    if status >= 500:
        return Result.SERVER_ERROR
    return Result.CLIENT_ERROR


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait, from ``retry-after-ms`` or else ``Retry-After`` (seconds or HTTP date)."""
    with contextlib.suppress(ValueError):
        if (ms := headers.get("retry-after-ms")) is not None:
            return max(0.0, float(ms) / 1000.0)
    value = headers.get("retry-after")
    if value is None:
        return None
    with contextlib.suppress(ValueError):
        return max(0.0, float(value))
    with contextlib.suppress(ValueError, TypeError):
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    return None


def retry_wait_s(spec: RetrySpec, retries_done: int, attempt: Attempt) -> float | None:
    """How long to wait before retrying ``attempt``, or None to stop (see ``RetrySpec``)."""
    if attempt.result in (Result.OK, Result.STREAM_ERROR) or retries_done >= spec.max_retries:
        return None
    if attempt.should_retry is not None:
        if not attempt.should_retry:
            return None
    elif not (attempt.status in (0, 408, 409, 429) or attempt.status >= 500):
        return None
    backoff = spec.backoff_s * 2.0**retries_done
    if not spec.honour_retry_after or attempt.retry_after_s is None:
        return backoff
    return None if attempt.retry_after_s > spec.max_wait_s else attempt.retry_after_s


async def post_chat(
    session: aiohttp.ClientSession,
    url: str,
    headers: Mapping[str, str],
    body: bytes,
    stream: bool,
    now_s: Callable[[], float],
) -> Attempt:
    """One POST of a chat completion; reads the whole answer (every stream event). A failure
    after a 200 arrived (a cut stream, bad JSON) is a stream error, not a connection error."""
    status = 0
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            status = resp.status
            if resp.status != 200:
                try:
                    error = _chunk.decode(await resp.read()).error
                except msgspec.DecodeError:
                    error = None
                return Attempt(
                    status=resp.status,
                    result=classify(resp.status, error),
                    done_s=now_s(),
                    error_type=_error_word(error),
                    retry_after_s=parse_retry_after(resp.headers),
                    should_retry={"true": True, "false": False}.get(
                        resp.headers.get("x-should-retry", "")
                    ),
                )
            if not stream:
                chunk = _chunk.decode(await resp.read())
                return _success(resp.status, chunk.usage, None, now_s())
            return await _read_stream(resp, now_s)
    except (aiohttp.ClientError, ConnectionError, msgspec.DecodeError) as exc:
        return Attempt(
            status=status,
            result=Result.STREAM_ERROR if status == 200 else Result.CONNECTION_ERROR,
            done_s=now_s(),
            error_type=type(exc).__name__,
        )


def _error_word(error: _Error | None) -> str | None:
    """The most specific word of an error body: its code when that is a word, else its type."""
    if error is None:
        return None
    return error.code if isinstance(error.code, str) else error.type


def _success(status: int, usage: _Usage | None, first: float | None, done: float) -> Attempt:
    return Attempt(
        status=status,
        result=Result.OK,
        done_s=done,
        first_token_s=first,
        prompt_tokens=usage.prompt_tokens if usage else None,
        output_tokens=usage.completion_tokens if usage else None,
    )


async def _read_stream(resp: aiohttp.ClientResponse, now_s: Callable[[], float]) -> Attempt:
    first: float | None = None
    usage: _Usage | None = None
    async for raw in resp.content:
        line = raw.strip()
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if data == b"[DONE]":
            return _success(resp.status, usage, first, now_s())
        chunk = _chunk.decode(data)
        if chunk.error is not None:
            oom = classify(500, chunk.error) is Result.OOM
            return Attempt(
                status=resp.status,
                result=Result.OOM if oom else Result.STREAM_ERROR,
                done_s=now_s(),
                first_token_s=first,
                error_type=_error_word(chunk.error),
            )
        if first is None and any(c.delta and c.delta.content for c in chunk.choices):
            first = now_s()
        usage = chunk.usage or usage
    return Attempt(
        status=resp.status,
        result=Result.STREAM_ERROR,
        done_s=now_s(),
        first_token_s=first,
        error_type="incomplete_stream",
    )


class _Live:
    """What is known so far about one request; becomes its record when it ends or is cut."""

    __slots__ = ("attempts", "honoured", "item", "last", "result", "retry_after_s", "sent_s")

    def __init__(self, item: PlannedRequest) -> None:
        self.item = item
        self.sent_s: float | None = None
        self.last: Attempt | None = None
        self.attempts: list[int] = []
        self.retry_after_s: float | None = None
        self.honoured: bool | None = None
        self.result: Result | None = None

    def record(self, scenario: Scenario) -> RequestRecord:
        item, last = self.item, self.last
        tenant = scenario.tenants[item.tenant]
        result = self.result or (last.result if last else Result.UNFINISHED)
        first = last.first_token_s if last else None
        done = last.done_s if last and self.result is not Result.UNFINISHED else None
        return RequestRecord(
            id=item.id,
            tenant=item.tenant,
            stream=item.stream,
            scheduled_s=item.at_s,
            sent_s=self.sent_s,
            first_token_s=first,
            done_s=done,
            status=last.status if last else 0,
            result=result,
            error_type=last.error_type if last else None,
            ttft_s=None if first is None else first - item.at_s,
            latency_s=None if done is None or result is not Result.OK else done - item.at_s,
            prompt_tokens=last.prompt_tokens if last else None,
            output_tokens=last.output_tokens if last else None,
            planned_prompt_tokens=item.prompt_tokens,
            planned_output_tokens=item.output_tokens,
            max_tokens=item.max_tokens,
            slo_ttft_s=tenant.slo.ttft_s,
            slo_latency_s=tenant.slo.latency_s,
            retries=max(0, len(self.attempts) - 1),
            retry_after_s=self.retry_after_s,
            retry_after_honoured=self.honoured,
            attempt_statuses=list(self.attempts),
        )


Extra = Callable[[float], Coroutine[object, None, None]]


class _Run:
    def __init__(self, scenario: Scenario, base_url: str, session: aiohttp.ClientSession) -> None:
        self.scenario = scenario
        self.url = base_url.rstrip("/") + "/v1/chat/completions"
        self.session = session
        self.loop = asyncio.get_running_loop()
        self.t0 = self.loop.time()
        self.end = self.t0 + scenario.duration_s + scenario.drain_timeout_s
        self.live: dict[int, _Live] = {}

    def now_s(self) -> float:
        return self.loop.time() - self.t0

    def body(self, item: PlannedRequest) -> bytes:
        body: dict[str, object] = {
            "model": self.scenario.model,
            "messages": chat_messages(item, self.scenario.backend.chars_per_token),
            "max_tokens": item.max_tokens,
            "sim_output_tokens": item.output_tokens,
            "stream": item.stream,
        }
        if item.stream:
            body["stream_options"] = {"include_usage": True}
        return msgspec.json.encode(body)

    async def fire(self, item: PlannedRequest) -> None:
        live = self.live[item.id]
        tenant = self.scenario.tenants[item.tenant]
        headers = {"Authorization": f"Bearer {tenant.key}", "Content-Type": "application/json"}
        give_up = self.end
        if tenant.timeout_s is not None:
            headers["x-request-timeout"] = f"{tenant.timeout_s:g}"
            give_up = min(give_up, self.t0 + item.at_s + tenant.timeout_s)
        body = self.body(item)
        try:
            async with asyncio.timeout_at(give_up):
                while True:
                    if live.sent_s is None:
                        live.sent_s = self.now_s()
                    live.last = await post_chat(
                        self.session, self.url, headers, body, item.stream, self.now_s
                    )
                    live.attempts.append(live.last.status)
                    if live.last.retry_after_s is not None:
                        live.retry_after_s = live.last.retry_after_s
                    wait = retry_wait_s(tenant.retry, len(live.attempts) - 1, live.last)
                    if wait is None or self.loop.time() + wait >= give_up:
                        return
                    if live.last.retry_after_s is not None:
                        kept = wait >= live.last.retry_after_s
                        live.honoured = kept if live.honoured is None else live.honoured and kept
                    await asyncio.sleep(wait)
        except TimeoutError:
            timed_out = tenant.timeout_s is not None and give_up < self.end
            live.result = Result.TIMEOUT if timed_out else Result.UNFINISHED
        except asyncio.CancelledError:
            live.result = Result.UNFINISHED
            raise

    def progress(self, out: TextIO, tasks: Sequence[asyncio.Task[None]]) -> None:
        ended = Counter(
            live.result or (live.last.result if live.last else Result.UNFINISHED)
            for live, task in zip(self.live.values(), tasks, strict=True)
            if task.done()
        )
        counts = " ".join(f"{r}={n}" for r, n in sorted(ended.items()))
        in_flight = len(tasks) - sum(ended.values())
        print(
            f"[{self.scenario.name}] t={self.now_s():6.1f}s sent={len(tasks)} "
            f"in_flight={in_flight} {counts}",
            file=out,
            flush=True,
        )


async def run_trace(
    scenario: Scenario,
    planned: Sequence[PlannedRequest],
    base_url: str,
    *,
    extras: Sequence[Extra] = (),
    progress: TextIO | None = sys.stderr,
    progress_every_s: float = 2.0,
) -> list[RequestRecord]:
    """Fire ``planned`` at ``base_url`` (loopback only) at their scheduled times and return one
    record per planned request, in id order. ``extras`` are started with the run's t0 (loop
    time) and cancelled when it ends: the harness uses them to sample the backend and to
    restart it on cue."""
    check_loopback(base_url)
    connector = aiohttp.TCPConnector(limit=scenario.max_connections)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10.0)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        run = _Run(scenario, base_url, session)
        side = [asyncio.create_task(extra(run.t0)) for extra in extras]
        tasks: list[asyncio.Task[None]] = []
        next_progress = run.t0 + progress_every_s
        try:
            for item in planned:
                while (delay := run.t0 + item.at_s - run.loop.time()) > 0:
                    if progress is not None and run.loop.time() >= next_progress:
                        run.progress(progress, tasks)
                        next_progress += progress_every_s
                    await asyncio.sleep(min(delay, max(0.0, next_progress - run.loop.time())))
                run.live[item.id] = _Live(item)
                tasks.append(asyncio.create_task(run.fire(item)))
            pending = set(tasks)
            while pending and run.loop.time() < run.end:
                wait_s = min(progress_every_s, run.end - run.loop.time())
                _, pending = await asyncio.wait(pending, timeout=wait_s)
                if progress is not None:
                    run.progress(progress, tasks)
        finally:
            for task in [*tasks, *side]:
                task.cancel()
            for task in [*tasks, *side]:
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        return [run.live.get(item.id, _Live(item)).record(scenario) for item in planned]
