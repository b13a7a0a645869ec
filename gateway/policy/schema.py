"""The policy file as written by users (DESIGN.md §7), decoded by msgspec.

These Structs check shape and single-field rules at decode time, so msgspec's error carries the
exact ``$.path``; ``compile.py`` turns them into the frozen runtime objects the gateway uses and
checks the rules that span fields (a limit naming an unknown model, duplicate keys...).
Human units stay strings here and are parsed in ``__post_init__``, so a bad one is reported at
its path.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta

from gateway.core.types import Unit
from gateway.policy import units

# Numbers are bounded here, not only where they are parsed: a NaN, an infinity or a 400-digit
# number is refused at decode time with its path, and the JSON Schema tells editors the ranges.
# The strings' patterns are for editors only; the unit parsers give the messages.
Size = (
    Annotated[str, Meta(extra_json_schema={"pattern": r"^\s*(\d+(\.\d*)?|\.\d+)\s*[a-zA-Z]*\s*$"})]
    | Annotated[int, Meta(ge=0, le=units.MAX_SIZE_BYTES)]
)
Seconds = Annotated[float, Meta(ge=0, le=units.MAX_DURATION_S)]
Duration = Annotated[str, Meta(extra_json_schema={"examples": ["30s", "100ms", "5m"]})] | Seconds
Share = (
    Annotated[str, Meta(extra_json_schema={"examples": ["10%"]})]
    | Annotated[float, Meta(ge=0, le=1)]
)
Positive = Annotated[int, Meta(ge=1, le=units.MAX_COUNT)]
PositiveFloat = Annotated[float, Meta(gt=0, le=units.MAX_AMOUNT)]
NonNegativeFloat = Annotated[float, Meta(ge=0, le=units.MAX_AMOUNT)]
Amount = (
    Annotated[str, Meta(extra_json_schema={"examples": ["40", "300k", "1M"]})]
    | Annotated[float, Meta(gt=0, le=units.MAX_AMOUNT)]
)
Rate = Annotated[str, Meta(extra_json_schema={"examples": ["20/s", "200k/min", "1M/day"]})]
T = TypeVar("T")
PriorityName = Literal["critical", "standard", "sheddable"]


class Base(msgspec.Struct, forbid_unknown_fields=True, frozen=True, kw_only=True):
    pass


class Timeouts(Base, frozen=True, kw_only=True):
    connect: Duration = "5s"
    first_byte: Duration = "120s"
    idle: Duration = "60s"
    total: Duration = "600s"

    def __post_init__(self) -> None:
        for name in ("connect", "first_byte", "idle", "total"):
            if _check(self, name, units.parse_duration) <= 0:
                raise ValueError(f"`{name}`: must be > 0")


class Admin(Base, frozen=True, kw_only=True):
    """The admin listener: /metrics, /admin/state, /admin/reload, /status and the probes. Bound
    anywhere but loopback it needs ``token`` (``env:VAR``), sent as ``Authorization: Bearer``."""

    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 9464
    token: str | None = None

    def __post_init__(self) -> None:
        if self.token is not None and not self.token.startswith("env:"):
            raise ValueError(
                "`token`: must be `env:VARIABLE`; a plaintext token does not belong in a "
                "policy file"
            )


class Tracing(Base, frozen=True, kw_only=True):
    """OpenTelemetry traces (the ``otel`` extra), exported over OTLP/HTTP to what the standard
    ``OTEL_EXPORTER_OTLP_*`` variables name."""

    enabled: bool = False
    service_name: str = "kvgate"


class Connections(Base, frozen=True, kw_only=True):
    """Client connections: caps (``max`` omitted: half the file limit at start) and the
    deadline of each phase (SECURITY.md). Take effect at restart."""

    max: Annotated[int, Meta(ge=1, le=10_000_000)] | None = None
    per_client: Positive = 256
    first_request: Duration = "10s"
    headers: Duration = "10s"
    body: Duration = "30s"
    idle: Duration = "30s"

    def __post_init__(self) -> None:
        for name in ("first_request", "headers", "body", "idle"):
            if _check(self, name, units.parse_duration) <= 0:
                raise ValueError(f"`{name}`: must be > 0")


class RequestLimits(Base, frozen=True, kw_only=True):
    """What parsing one body may cost: refused with a 400 naming the limit before the full
    parse (``messages``: messages or other JSON objects; ``depth``: nesting)."""

    messages: Positive = 10_000
    depth: Annotated[int, Meta(ge=2, le=512)] = 64
    part_chars: Positive = 4_000_000


class Server(Base, frozen=True, kw_only=True):
    """The listener and upstream timeouts; host, port, grace_period, access_log, the admin
    listener's address and a larger max_body take effect at restart, the rest on reload."""

    host: str = "127.0.0.1"
    port: Annotated[int, Meta(ge=0, le=65535)] = 8080
    max_body: Size = "8MiB"
    grace_period: Duration = "10s"
    anonymous_tenant: str | None = None
    fallback_model: str | None = None  # pool that receives paths without a JSON model
    access_log: bool = True  # one JSON line per request on stderr
    # A request naming a model on a path without cost rules: refused (404), costed from its
    # body's length with the model's default output, or let through at one request.
    unknown_endpoints: Literal["deny", "estimate", "free"] = "estimate"
    timeouts: Timeouts = msgspec.field(default_factory=Timeouts)
    admin: Admin = msgspec.field(default_factory=Admin)
    tracing: Tracing = msgspec.field(default_factory=Tracing)
    # On SIGTERM /readyz answers 503 this long before the listener closes, so load balancers
    # stop sending new requests while the old ones are still accepted.
    drain_delay: Duration = "5s"
    connections: Connections = msgspec.field(default_factory=Connections)
    limits: RequestLimits = msgspec.field(default_factory=RequestLimits)
    # Paths proxied besides each flavor's API paths (exact, or a prefix ending in `*`).
    allow_paths: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check(self, "max_body", units.parse_size)
        _check(self, "grace_period", units.parse_duration)
        _check(self, "drain_delay", units.parse_duration)


class MemoryStore(Base, frozen=True, kw_only=True, tag="memory", tag_field="kind"):
    pass


class RedisStore(Base, frozen=True, kw_only=True, tag="redis", tag_field="kind"):
    url: str = "redis://127.0.0.1:6379/0"
    on_error: Literal["local", "allow", "deny"] = "local"
    prefix: str = "kvgate"
    replicas: Positive = 1  # gateways sharing the store: under on_error local, each keeps 1/N


class KVProfile(Base, frozen=True, kw_only=True):
    layers: Positive
    kv_heads: Positive
    head_dim: Positive
    dtype: Literal["fp32", "bf16", "fp16", "fp8", "int8"] = "bf16"


class Tokenizer(Base, frozen=True, kw_only=True):
    tiktoken: str | None = None  # an encoding name that ships with tiktoken, e.g. cl100k_base
    file: str | None = None  # a local tokenizer.json (the `tokenizers` extra)

    def __post_init__(self) -> None:
        if (self.tiktoken is None) == (self.file is None):
            raise ValueError("tokenizer needs exactly one of `tiktoken` or `file`")


class Speed(Base, frozen=True, kw_only=True):
    prefill_tokens_per_s: PositiveFloat = 8000.0
    decode_tokens_per_s: PositiveFloat = 40.0  # per sequence


class Price(Base, frozen=True, kw_only=True):
    input: NonNegativeFloat = 0.0  # per million tokens
    output: NonNegativeFloat = 0.0


class MetricNames(Base, frozen=True, kw_only=True):
    kv_usage: str | None = None
    fragmentation: str | None = None
    largest_free_block: str | None = None
    running: str | None = None
    waiting: str | None = None
    preemptions: str | None = None
    capacity_blocks: str | None = None


class Metrics(Base, frozen=True, kw_only=True):
    path: str = "/metrics"
    names: MetricNames = msgspec.field(default_factory=MetricNames)


class Backend(Base, frozen=True, kw_only=True):
    """One server of a model (vLLM, SGLang, TGI, llama.cpp or any OpenAI-compatible one)."""

    url: str
    kv_capacity: Size | None = None
    signals: Literal["vllm", "sglang", "tgi", "llamacpp", "generic", "none"] = "vllm"
    memory: Literal["paged", "contiguous"] = "paged"
    reserve: Literal["likely", "worst_case"] | None = (
        None  # default: paged → likely, else worst_case
    )
    block_size: Positive | None = None
    warmup: Duration = "60s"
    # how long a first load is expected to take, until one has been seen; default by signals:
    # 10s for llamacpp, 60s for the others
    expected_load: Duration | None = None
    probe_interval: Duration = "1s"
    max_concurrency: Positive | None = None
    metrics: Metrics = msgspec.field(default_factory=Metrics)
    health_path: str = "/health"
    api_key: str | None = None  # env:VAR
    served_name: str | None = None  # the model id this backend serves, if not the model's

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(
                f"`url`: must start with http:// or https://, got {units.excerpt(self.url)}"
            )
        if self.kv_capacity is not None:
            _check(self, "kv_capacity", units.parse_size)
        _check(self, "warmup", units.parse_duration)
        if self.expected_load is not None:
            _check(self, "expected_load", units.parse_duration)
        if _check(self, "probe_interval", units.parse_duration) <= 0:
            raise ValueError("`probe_interval`: must be > 0")
        if self.api_key is not None and not self.api_key.startswith("env:"):
            raise ValueError("`api_key`: must be `env:VARIABLE`; secrets do not belong in the file")


class Limit(Base, frozen=True, kw_only=True):
    """A token bucket: `rate` like 20/s or 1M/day, `burst` defaults to one period's worth."""

    unit: Unit
    rate: Rate
    burst: Amount | None = None  # default: one period's worth
    model: str | None = None  # tenant limits: only requests for this model
    # true: a request this limit would refuse waits for its turn instead, in arrival order,
    # when that turn comes before the request's queue deadline (else it gets the 429)
    wait: bool = False

    def __post_init__(self) -> None:
        amount, _ = _check(self, "rate", units.parse_rate)
        if amount <= 0:
            raise ValueError(f"`rate`: must be > 0, got {units.excerpt(self.rate)}")
        if self.burst is not None and _check(self, "burst", units.parse_amount) <= 0:
            raise ValueError(f"`burst`: must be > 0, got {units.excerpt(self.burst)}")


class Model(Base, frozen=True, kw_only=True):
    """A model: its KV-cache shape, its backends and the limits all tenants share on it."""

    kv: KVProfile
    context: Positive = 8192
    default_max_tokens: Positive = 1024
    chars_per_token: PositiveFloat = 4.0
    served_name: str | None = None  # the model id its backends serve, if not the public name
    tokenizer: Tokenizer | None = None
    speed: Speed = msgspec.field(default_factory=Speed)
    price: Price = msgspec.field(default_factory=Price)
    backends: Annotated[list[Backend], Meta(min_length=1)]
    limits: list[Limit] = msgspec.field(default_factory=list)

    def __post_init__(self) -> None:
        if self.default_max_tokens > self.context:
            raise ValueError("`default_max_tokens`: cannot exceed `context`")
        for limit in self.limits:
            if limit.model is not None:
                raise ValueError("a model's own limits cannot name another `model`")


class Tenant(Base, frozen=True, kw_only=True):
    """A client: its keys (`env:VAR` or `sha256:<hex>`), priority, fair-share weight, limits."""

    keys: list[str] = msgspec.field(default_factory=list)
    priority: PriorityName = "standard"
    weight: PositiveFloat = 1.0
    limits: list[Limit] = msgspec.field(default_factory=list)
    shadow: bool = False
    models: list[str] | None = None  # the models it may use; None: every model
    # how long its requests may queue for admission; None: admission.queue.max_wait
    max_wait: Duration | None = None

    def __post_init__(self) -> None:
        if self.max_wait is not None:
            _check(self, "max_wait", units.parse_duration)
        for key in self.keys:
            if key.startswith("env:"):
                continue
            digest = key.removeprefix("sha256:")
            if not key.startswith("sha256:") or len(digest) != 64 or not _is_hex(digest):
                raise ValueError(
                    "`keys`: each must be `env:VARIABLE` or `sha256:<64 hex digits>`; "
                    "plaintext keys do not belong in a policy file"
                )


class Queue(Base, frozen=True, kw_only=True):
    max_wait: Duration = "30s"
    max_depth: Positive = 1000
    # CoDel's standing-queue target; auto: the measured time a request holds its memory
    target_delay: Duration = "auto"
    interval: Duration = "100ms"

    def __post_init__(self) -> None:
        names = ("max_wait", "interval") if self.target_delay == "auto" else None
        for name in names or ("max_wait", "target_delay", "interval"):
            _check(self, name, units.parse_duration)


class Fragmentation(Base, frozen=True, kw_only=True):
    shed_above: Share = 0.5
    large_request: Share = "10%"

    def __post_init__(self) -> None:
        _check(self, "shed_above", units.parse_share)
        _check(self, "large_request", units.parse_share)


class Warmup(Base, frozen=True, kw_only=True):
    floor: Share = "10%"

    def __post_init__(self) -> None:
        _check(self, "floor", units.parse_share)


class Eject(Base, frozen=True, kw_only=True):
    failures: Positive = 3
    cooldown: Duration = "10s"

    def __post_init__(self) -> None:
        _check(self, "cooldown", units.parse_duration)


class Shared(Base, frozen=True, kw_only=True):
    """In-flight reservations shared by every replica through the Redis of ``store:``."""

    lease: Duration = "5s"  # a replica silent this long is dead: its reservations are freed
    refresh: Duration = "250ms"  # heartbeat, and how fresh the other replicas' figures are
    timeout: Duration = "200ms"  # longest a request waits on Redis before the fallback

    def __post_init__(self) -> None:
        for name in ("lease", "refresh", "timeout"):
            if _check(self, name, units.parse_duration) <= 0:
                raise ValueError(f"`{name}`: must be > 0")
        if units.parse_duration(self.refresh) >= units.parse_duration(self.lease):
            raise ValueError("`refresh`: must be shorter than `lease`")


class Admission(Base, frozen=True, kw_only=True):
    enabled: bool = True
    headroom: Share = "10%"
    queue: Queue = msgspec.field(default_factory=Queue)
    fragmentation: Fragmentation = msgspec.field(default_factory=Fragmentation)
    warmup: Warmup = msgspec.field(default_factory=Warmup)
    eject: Eject = msgspec.field(default_factory=Eject)
    stale_after: Duration = "5s"
    output_quantile: Share = 0.9
    shared: Shared | None = None  # None: each process plans every backend by itself

    def __post_init__(self) -> None:
        _check(self, "headroom", units.parse_share)
        _check(self, "stale_after", units.parse_duration)
        _check(self, "output_quantile", units.parse_share)


class Policy(Base, frozen=True, kw_only=True):
    """A kvgate policy file (version 1)."""

    version: Literal[1]
    server: Server = msgspec.field(default_factory=Server)
    store: MemoryStore | RedisStore = msgspec.field(default_factory=MemoryStore)
    shadow: bool = False
    models: Annotated[dict[str, Model], Meta(min_length=1)]
    tenants: dict[str, Tenant] = msgspec.field(default_factory=dict)
    admission: Admission = msgspec.field(default_factory=Admission)


def _check(struct: msgspec.Struct, name: str, parse: Callable[[Any], T]) -> T:
    """Parse field ``name`` with ``parse``; a failure names the field so the loader can point
    at its line."""
    try:
        return parse(getattr(struct, name))
    except ValueError as exc:
        raise ValueError(f"`{name}`: {exc}") from None


def _is_hex(text: str) -> bool:
    try:
        int(text, 16)
    except ValueError:
        return False
    return True
