"""Decoded policy → the frozen runtime ``Policy`` the gateway serves with.

Resolves secrets (``env:VAR``), parses units, checks rules that span the file (a limit naming an
unknown model, two limits with the same key, the anonymous tenant existing), precomputes the bucket
specs of every (tenant, model) pair so the hot path does one dict lookup, and fingerprints the
policy so logs and the admin view say which version is live.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import msgspec

from gateway.core.backend import (
    DEFAULT_BLOCK_SIZE,
    BackendConfig,
    MemoryKind,
    ReserveMode,
    Signals,
)
from gateway.core.bucket import BucketSpec
from gateway.core.capacity import CapacityConfig
from gateway.core.cost import DTYPE_BYTES, ModelProfile
from gateway.core.pool import AdmissionConfig, ModelPool
from gateway.core.queueing import QueueConfig
from gateway.core.types import Priority, Unit
from gateway.errors import PolicyError
from gateway.policy import schema, units


@dataclass(frozen=True, slots=True)
class UpstreamTimeouts:
    """Seconds: to connect, to the first byte, between two chunks, and for the whole exchange."""

    connect_s: float
    first_byte_s: float
    idle_s: float
    total_s: float


@dataclass(frozen=True, slots=True)
class AdminSettings:
    host: str = "127.0.0.1"
    port: int = 9464
    token: str | None = field(default=None, repr=False)  # resolved; None: no token asked


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    """Caps and deadlines (seconds) for client connections; ``max_open`` None: half the
    file limit at start."""

    max_open: int | None = None
    per_client: int = 256
    first_request_s: float = 10.0
    headers_s: float = 10.0
    body_s: float = 30.0
    idle_s: float = 30.0


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """Bounds on what parsing one body may cost (``server.limits``)."""

    messages: int = 10_000
    depth: int = 64
    part_chars: int = 4_000_000


@dataclass(frozen=True, slots=True)
class ServerSettings:
    host: str
    port: int
    max_body_bytes: int
    grace_period_s: float
    timeouts: UpstreamTimeouts
    fallback_model: str | None
    unknown_endpoints: str = "estimate"  # deny | estimate | free
    admin: AdminSettings = field(default_factory=AdminSettings)
    drain_delay_s: float = 0.0  # /readyz fails this long on SIGTERM before the listener closes
    connections: ConnectionLimits = ConnectionLimits()
    limits: RequestLimits = RequestLimits()
    allow_paths: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class SharedAdmission:
    """``admission.shared`` resolved against ``store:`` (always Redis)."""

    url: str
    prefix: str
    replicas: int
    lease_s: float
    refresh_s: float
    timeout_s: float


@dataclass(frozen=True, slots=True)
class Tenant:
    name: str
    priority: Priority
    weight: float
    shadow: bool
    models: frozenset[str] | None = None  # the models it may use; None: every model
    max_wait_s: float | None = None  # its queue deadline; None: the policy's max_wait


@dataclass(frozen=True, slots=True)
class Backend:
    url: str
    authorization: str | None  # "Bearer <key>" sent upstream, resolved from env at compile time
    config: BackendConfig = field(repr=False)  # what admission and the monitor need
    served_name: str | None = None  # the model id sent upstream in place of the public name


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    profile: ModelProfile
    backends: tuple[Backend, ...]
    tokenizer: schema.Tokenizer | None


@dataclass(frozen=True, slots=True)
class Policy:
    source: str
    fingerprint: str
    spec: schema.Policy
    server: ServerSettings
    models: Mapping[str, Model]
    tenants: Mapping[str, Tenant]
    anonymous: Tenant | None
    shadow: bool
    max_wait_s: float  # longest a request may queue for admission
    admission: AdmissionConfig
    _by_key: Mapping[bytes, Tenant] = field(repr=False)
    _buckets: Mapping[tuple[str, str], tuple[BucketSpec, ...]] = field(repr=False)
    _limit_words: Mapping[str, str] = field(default_factory=dict, repr=False)
    shared: SharedAdmission | None = None  # admission.shared: reservations shared in Redis

    def limit_words(self, key: str) -> str:
        """A bucket in the policy's own words, e.g. "tenant acme's tokens limit of 200k/min",
        for messages to clients (its key is internal)."""
        return self._limit_words.get(key, "a limit of this gateway's policy")

    def tenant_for_key(self, key: str | None) -> Tenant | None:
        """The tenant a request presenting ``key`` is (the anonymous one without a key), or
        None: the key is unknown, or there is no key and no anonymous tenant."""
        if key is None:
            return self.anonymous
        try:
            return self._by_key.get(hashlib.sha256(key.encode()).digest())
        except UnicodeEncodeError:  # the header's bytes were not UTF-8: no key can match
            return None

    def buckets(self, tenant: str, model: str) -> tuple[BucketSpec, ...]:
        """Every bucket a request of ``tenant`` for ``model`` must pass, all or nothing."""
        return self._buckets.get((tenant, model), ())

    def request_buckets(self, tenant: str) -> tuple[BucketSpec, ...]:
        """The tenant's own limits on requests that hold whatever the model: what a request
        refused for its body is still charged, so a flood of bad requests is limited like any
        other (only refusals read them: no table is kept for it)."""
        prefix = f"t:{tenant}:*:"
        for (name, _), specs in self._buckets.items():
            if name == tenant:
                return tuple(
                    s for s in specs if s.unit is Unit.REQUESTS and s.key.startswith(prefix)
                )
        return ()


def store_kind(policy: Policy) -> str:
    return "redis" if isinstance(policy.spec.store, schema.RedisStore) else "memory"


def compile_policy(
    spec: schema.Policy, source: str = "<string>", env: Mapping[str, str] | None = None
) -> Policy:
    env = os.environ if env is None else env
    models = {name: _model(name, m, source, env) for name, m in spec.models.items()}
    tenants = {
        name: Tenant(
            name,
            Priority.parse(t.priority),
            t.weight,
            t.shadow or spec.shadow,
            None if t.models is None else frozenset(t.models),
            None if t.max_wait is None else units.parse_duration(t.max_wait),
        )
        for name, t in spec.tenants.items()
    }
    for name, t in spec.tenants.items():
        for i, model_name in enumerate(t.models or ()):
            if model_name not in models:
                raise PolicyError(
                    source, f"at $.tenants.{name}.models[{i}]: no model named {model_name!r}"
                )
    anonymous = None
    if spec.server.anonymous_tenant is not None:
        anonymous = tenants.get(spec.server.anonymous_tenant)
        if anonymous is None:
            raise PolicyError(
                source,
                f"at $.server.anonymous_tenant: no tenant named {spec.server.anonymous_tenant!r}",
            )
    fallback = spec.server.fallback_model
    if fallback is not None and fallback not in models:
        raise PolicyError(source, f"at $.server.fallback_model: no model named {fallback!r}")
    return Policy(
        source=source,
        fingerprint=hashlib.sha256(msgspec.json.encode(spec)).hexdigest()[:12],
        spec=spec,
        server=_server(spec.server, _admin(spec.server.admin, source, env)),
        models=models,
        tenants=tenants,
        anonymous=anonymous,
        shadow=spec.shadow,
        max_wait_s=units.parse_duration(spec.admission.queue.max_wait),
        admission=_admission(spec.admission, models),
        _by_key=_keys(spec, tenants, source, env),
        _buckets=_buckets(spec, source),
        _limit_words=_limit_words(spec),
        shared=_shared(spec, source),
    )


def _shared(spec: schema.Policy, source: str) -> SharedAdmission | None:
    shared = spec.admission.shared
    if shared is None:
        return None
    store = spec.store
    if not isinstance(store, schema.RedisStore):
        raise PolicyError(
            source, "at $.admission.shared: shared admission needs `store: {kind: redis}`"
        )
    return SharedAdmission(
        url=store.url,
        prefix=store.prefix,
        replicas=store.replicas,
        lease_s=units.parse_duration(shared.lease),
        refresh_s=units.parse_duration(shared.refresh),
        timeout_s=units.parse_duration(shared.timeout),
    )


def _admin(admin: schema.Admin, source: str, env: Mapping[str, str]) -> AdminSettings:
    token = None
    if admin.token is not None:
        token = _secret(admin.token, env, source, "$.server.admin.token")
    elif not _loopback(admin.host):
        raise PolicyError(
            source,
            f"at $.server.admin.token: the admin listener binds {admin.host!r}, reachable from "
            "other hosts, so it needs a bearer token (`token: env:VARIABLE`)",
        )
    return AdminSettings(host=admin.host, port=admin.port, token=token)


def _loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name other than localhost may resolve anywhere


def _limit_words(spec: schema.Policy) -> dict[str, str]:
    """Each bucket key (as ``_buckets`` spells them) in the policy's words."""

    def words(owner: str, prefix: str, limit: schema.Limit) -> tuple[str, str]:
        _, period_s = units.parse_rate(limit.rate)
        scope = limit.model or "*"
        text = f"{owner}'s {limit.unit.value} limit of {limit.rate}"
        if limit.model is not None:
            text += f" on model {limit.model}"
        if limit.burst is not None:
            burst = limit.burst if isinstance(limit.burst, str) else f"{limit.burst:g}"
            text += f" (burst {burst})"
        return f"{prefix}:{scope}:{limit.unit.value}:{period_s:g}", text

    out: dict[str, str] = {}
    for name, m in spec.models.items():
        out.update(words(f"model {name}", f"m:{name}", limit) for limit in m.limits)
    for name, t in spec.tenants.items():
        out.update(words(f"tenant {name}", f"t:{name}", limit) for limit in t.limits)
    return out


def _server(server: schema.Server, admin: AdminSettings) -> ServerSettings:
    t = server.timeouts
    return ServerSettings(
        host=server.host,
        port=server.port,
        max_body_bytes=units.parse_size(server.max_body),
        grace_period_s=units.parse_duration(server.grace_period),
        timeouts=UpstreamTimeouts(
            connect_s=units.parse_duration(t.connect),
            first_byte_s=units.parse_duration(t.first_byte),
            idle_s=units.parse_duration(t.idle),
            total_s=units.parse_duration(t.total),
        ),
        fallback_model=server.fallback_model,
        unknown_endpoints=server.unknown_endpoints,
        admin=admin,
        drain_delay_s=units.parse_duration(server.drain_delay),
        connections=_connections(server.connections),
        limits=RequestLimits(
            messages=server.limits.messages,
            depth=server.limits.depth,
            part_chars=server.limits.part_chars,
        ),
        allow_paths=server.allow_paths,
    )


def _connections(c: schema.Connections) -> ConnectionLimits:
    return ConnectionLimits(
        max_open=c.max,
        per_client=c.per_client,
        first_request_s=units.parse_duration(c.first_request),
        headers_s=units.parse_duration(c.headers),
        body_s=units.parse_duration(c.body),
        idle_s=units.parse_duration(c.idle),
    )


def _model(name: str, m: schema.Model, source: str, env: Mapping[str, str]) -> Model:
    block_size = next((b.block_size for b in m.backends if b.block_size), DEFAULT_BLOCK_SIZE)
    profile = ModelProfile(
        layers=m.kv.layers,
        kv_heads=m.kv.kv_heads,
        head_dim=m.kv.head_dim,
        dtype_bytes=DTYPE_BYTES[m.kv.dtype],
        block_size=block_size,
        context_tokens=m.context,
        default_max_tokens=m.default_max_tokens,
        chars_per_token=m.chars_per_token,
        prefill_tokens_per_s=m.speed.prefill_tokens_per_s,
        decode_tokens_per_s=m.speed.decode_tokens_per_s,
        price_input_per_mtok=m.price.input,
        price_output_per_mtok=m.price.output,
    )
    backends = []
    for i, b in enumerate(m.backends):
        key = None
        if b.api_key is not None:
            key = _secret(b.api_key, env, source, f"$.models.{name}.backends[{i}].api_key")
        url = b.url.rstrip("/")
        if urlsplit(url).username is not None or urlsplit(url).password is not None:
            raise PolicyError(
                source,
                f"at $.models.{name}.backends[{i}].url: credentials in a URL end up in logs, "
                "metrics and /admin/state; give them as `api_key: env:VARIABLE`",
            )
        config = BackendConfig(
            url=url,
            signals=Signals(b.signals),
            kv_capacity_bytes=units.parse_size(b.kv_capacity) if b.kv_capacity else None,
            memory=MemoryKind(b.memory),
            reserve=ReserveMode(b.reserve) if b.reserve else None,
            block_size=b.block_size,
            warmup_s=units.parse_duration(b.warmup),
            expected_load_s=None
            if b.expected_load is None
            else units.parse_duration(b.expected_load),
            probe_interval_s=units.parse_duration(b.probe_interval),
            max_concurrency=b.max_concurrency,
            metrics_path=b.metrics.path,
            metric_names=tuple(
                (signal, name)
                for signal, name in msgspec.structs.asdict(b.metrics.names).items()
                if name
            ),
            health_path=b.health_path,
            api_key=key,
        )
        served = b.served_name or m.served_name
        authorization = f"Bearer {key}" if key else None
        backends.append(Backend(url, authorization, config, served_name=served))
    return Model(name=name, profile=profile, backends=tuple(backends), tokenizer=m.tokenizer)


def _admission(a: schema.Admission, models: Mapping[str, Model]) -> AdmissionConfig:
    pools = tuple(
        ModelPool(
            name=name,
            kv_bytes_per_token=m.profile.kv_bytes_per_token,
            backends=tuple(b.config for b in m.backends),
        )
        for name, m in models.items()
    )
    return AdmissionConfig(
        models=pools,
        enabled=a.enabled,
        capacity=CapacityConfig(
            headroom=units.parse_share(a.headroom),
            warmup_floor=units.parse_share(a.warmup.floor),
            stale_after_s=units.parse_duration(a.stale_after),
            shed_above=units.parse_share(a.fragmentation.shed_above),
            large_request=units.parse_share(a.fragmentation.large_request),
            eject_failures=a.eject.failures,
            eject_cooldown_s=units.parse_duration(a.eject.cooldown),
        ),
        queue=QueueConfig(
            max_wait_s=units.parse_duration(a.queue.max_wait),
            max_depth=a.queue.max_depth,
            target_delay_s=None
            if a.queue.target_delay == "auto"
            else units.parse_duration(a.queue.target_delay),
            interval_s=units.parse_duration(a.queue.interval),
        ),
        output_quantile=units.parse_share(a.output_quantile),
    )


def _secret(ref: str, env: Mapping[str, str], source: str, where: str) -> str:
    var = ref.removeprefix("env:")
    value = env.get(var)
    if not value:
        raise PolicyError(source, f"at {where}: environment variable {var} is not set")
    return value


def _keys(
    spec: schema.Policy, tenants: Mapping[str, Tenant], source: str, env: Mapping[str, str]
) -> dict[bytes, Tenant]:
    by_key: dict[bytes, Tenant] = {}
    for name, t in spec.tenants.items():
        for i, ref in enumerate(t.keys):
            where = f"$.tenants.{name}.keys[{i}]"
            if ref.startswith("sha256:"):
                digest = bytes.fromhex(ref.removeprefix("sha256:"))
            else:
                digest = hashlib.sha256(_secret(ref, env, source, where).encode()).digest()
            other = by_key.get(digest)
            if other is not None and other.name != name:
                raise PolicyError(source, f"at {where}: the same key is also {other.name!r}'s")
            by_key[digest] = tenants[name]
    return by_key


def _spec(key: str, limit: schema.Limit) -> BucketSpec:
    amount, period_s = units.parse_rate(limit.rate)
    burst = units.parse_amount(limit.burst) if limit.burst is not None else amount
    return BucketSpec(
        key=key, unit=limit.unit, rate_per_s=amount / period_s, burst=burst, waits=limit.wait
    )


def _buckets(spec: schema.Policy, source: str) -> dict[tuple[str, str], tuple[BucketSpec, ...]]:
    seen: set[str] = set()

    def compiled(prefix: str, where: str, limits: list[schema.Limit]) -> list[BucketSpec]:
        out = []
        for i, limit in enumerate(limits):
            _, period_s = units.parse_rate(limit.rate)
            scope = limit.model or "*"
            key = f"{prefix}:{scope}:{limit.unit.value}:{period_s:g}"
            if key in seen:
                raise PolicyError(
                    source,
                    f"at {where}[{i}]: a second {limit.unit.value} limit over the same period "
                    f"for {scope!r}; merge them",
                )
            if limit.model is not None and limit.model not in spec.models:
                raise PolicyError(source, f"at {where}[{i}].model: no model named {limit.model!r}")
            seen.add(key)
            out.append(_spec(key, limit))
        return out

    per_model = {
        name: compiled(f"m:{name}", f"$.models.{name}.limits", m.limits)
        for name, m in spec.models.items()
    }
    table: dict[tuple[str, str], tuple[BucketSpec, ...]] = {}
    for tenant_name, t in spec.tenants.items():
        own = compiled(f"t:{tenant_name}", f"$.tenants.{tenant_name}.limits", t.limits)
        for model_name in spec.models:
            scoped = [
                s for s, lim in zip(own, t.limits, strict=True) if lim.model in (None, model_name)
            ]
            table[(tenant_name, model_name)] = (*scoped, *per_model[model_name])
    return table
