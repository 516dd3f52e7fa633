"""The routing configuration: one declared model, frozen, validated, typed.

``parse_config(text, env=...)`` reads routing YAML given as text (the caller reads the
file and passes the environment; this module does neither) and returns a ``Config``,
or raises ``ConfigError`` listing every problem with its line and YAML path. Each
section of the file is declared once as a frozen pydantic dataclass (here and in
``_policies``): the declaration gives validation, the JSON Schema
(``routing.schema``), the Helm chart's schema and the README's settings table.
Decision code never sees a raw dict.

Vocabulary follows Envoy: an *upstream* is a cluster (one provider account in one
region, or a pool of self-hosted servers = its *endpoints*); a *route* maps a model
alias the client asks for to an ordered list of upstream *targets*.
"""

from __future__ import annotations

import dataclasses
import ipaddress
from collections.abc import Mapping, Set
from types import MappingProxyType
from typing import Annotated, Final

from pydantic import BeforeValidator, Field, TypeAdapter, ValidationError, model_validator
from pydantic.dataclasses import dataclass
from pydantic.json_schema import SkipJsonSchema

from ._clouds import (
    AzureSettings,
    BedrockSettings,
    Provider,
    UpstreamAuth,
    VertexSettings,
    default_url,
    provider_problem,
)
from ._errors import ConfigError, ConfigProblem
from ._jobs_policy import JobsPolicy
from ._policies import (
    DEFAULT_PROMETHEUS_QUERY,
    BreakerPolicy,
    CacheMode,
    CacheModeValue,
    CachePolicy,
    CacheScope,
    DegradationPolicy,
    LatencyPolicy,
    ObjectPolicy,
    PoolScrape,
    PrometheusSource,
    RetryPolicy,
    SessionPolicy,
    Strategy,
    SyncPolicy,
)
from ._problems import cross_reference_problems, repeat_problems, validation_problems
from ._values import (
    SECTION,
    Count,
    Duration,
    Flag,
    HttpUrl,
    Kind,
    Name,
    Size,
    Text,
    invalid,
    parse_duration,
)
from ._yaml import decode, read_document

#: Request bodies above this are refused with 413; chat payloads with long contexts
#: and a few images stay well under it.
DEFAULT_MAX_BODY_BYTES: Final = 16 * 1024 * 1024
#: A busy DeepSeek keeps a connection open for ~10 minutes with keep-alives only;
#: 30 s is long enough for a cold large model and far shorter than that.
DEFAULT_FIRST_TOKEN_TIMEOUT_S: Final = 30.0
DEFAULT_CONNECT_TIMEOUT_S: Final = 5.0
#: Longest silence between two bytes once an answer has started.
DEFAULT_IDLE_TIMEOUT_S: Final = 60.0
#: Overall deadline for one client request, all attempts together.
DEFAULT_ROUTE_TIMEOUT_S: Final = 600.0
DEFAULT_MAX_ATTEMPTS: Final = 3
#: Connections kept open to one upstream (all its endpoints together).
DEFAULT_MAX_CONNECTIONS: Final = 256
#: File uploads, audio and image edits are streamed through, so they may be far
#: bigger than JSON bodies; OpenAI's own file limit is 512 MB.
DEFAULT_MAX_UPLOAD_BYTES: Final = 512 * 1024 * 1024
#: Where clients may put their key: the OpenAI SDKs, Azure SDKs, several others.
DEFAULT_KEY_HEADERS: Final = ("authorization", "api-key", "x-api-key")
#: Never forwarded from a client, whatever ``forward_headers`` says.
_UNFORWARDABLE: Final = frozenset({
    "authorization", "api-key", "x-api-key", "x-goog-api-key", "cookie", "connection",
    "keep-alive", "te", "trailer", "transfer-encoding", "upgrade", "proxy-authorization",
    "host", "content-length"})

#: Client-side limits default to nginx's own defaults or stricter:
#: ``client_header_timeout`` 60s, ``client_body_timeout`` 60s, ``keepalive_timeout``
#: 75s, ``send_timeout`` 60s, ``worker_connections`` 512.
DEFAULT_HEAD_TIMEOUT_S: Final = 60.0
DEFAULT_BODY_TIMEOUT_S: Final = 60.0
DEFAULT_KEEPALIVE_TIMEOUT_S: Final = 75.0
DEFAULT_SEND_TIMEOUT_S: Final = 60.0
DEFAULT_MAX_CLIENT_CONNECTIONS: Final = 512
#: Longest wait for a free connection to an upstream (its ``max_connections``)
#: before the next target is tried; the wait is not held against the upstream.
DEFAULT_POOL_TIMEOUT_S: Final = 2.0

__all__ = [
    "DEFAULT_PROMETHEUS_QUERY",
    "Admin",
    "ApiKey",
    "Auth",
    "BreakerPolicy",
    "CacheMode",
    "CachePolicy",
    "CacheScope",
    "Config",
    "DegradationPolicy",
    "Instance",
    "LatencyPolicy",
    "Limits",
    "Listen",
    "ObjectPolicy",
    "PoolScrape",
    "PrometheusSource",
    "RetryPolicy",
    "Route",
    "SessionPolicy",
    "Strategy",
    "SyncPolicy",
    "Upstream",
    "parse_config",
]


@dataclass(frozen=True, slots=True, kw_only=True, config=SECTION)
class Listen:
    """Where skyroute listens."""

    host: str = "127.0.0.1"
    port: int = Field(default=8080, ge=0, le=65535)

    @classmethod
    def parse(cls, value: object) -> Listen:
        """``host:port``, ``:port`` or a bare port number."""
        if isinstance(value, Listen):
            return value
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise invalid(f"{value!r} is not host:port (e.g. 127.0.0.1:8080)")
        text = str(value)
        host, sep, port = text.rpartition(":")
        if not sep:
            host, port = "127.0.0.1", text
        if not port.isdigit() or int(port) > 65535:
            raise invalid(f"{text!r} is not host:port (e.g. 127.0.0.1:8080)")
        return cls(host=host.strip("[]") or "0.0.0.0", port=int(port))


_LISTEN_FORMS = r"^((\[[0-9A-Fa-f:.]+\]|[^:\s]*):)?[0-9]{1,5}$"
#: The ``listen`` key: ``host:port``, ``:port`` (all interfaces) or a port.
ListenAddress = Annotated[Listen, BeforeValidator(Listen.parse), Kind(
    "host:port", show=lambda v: f"{v.host}:{v.port}", json_schema={"anyOf": [
        {"type": "string", "pattern": _LISTEN_FORMS},
        {"type": "integer", "minimum": 0, "maximum": 65535}]})]


@dataclass(frozen=True, slots=True, kw_only=True, config=SECTION)
class ApiKey:
    """A client key: who may call skyroute, and (with state sync) their limits."""

    name: Name = Field(description="Who the key belongs to (shown in logs and metrics).")
    key: Text = Field(
        repr=False,
        description="The key a client sends as its OpenAI API key; write it as ${ENV_NAME}.")
    rpm: Count | None = Field(
        default=None,
        description="Requests per minute for this key, across all instances.")
    tpm: Count | None = Field(
        default=None,
        description="Tokens per minute for this key, across all instances.")
    max_concurrent: Count | None = Field(
        default=None,
        description="Requests in flight at once for this key, on one instance (429 past it).")


@dataclass(frozen=True, slots=True, kw_only=True, config=SECTION)
class Auth:
    """Client keys. Without an ``auth`` section skyroute accepts any caller."""

    api_keys: tuple[ApiKey, ...] = Field(
        default=(),
        description="The client keys; a key whose ${VAR} is set but empty is left out.")
    key_headers: tuple[Name, ...] = Field(
        default=DEFAULT_KEY_HEADERS, min_length=1,
        description="Request headers a client key is read from: authorization (as Bearer), "
                    "api-key (Azure SDKs), x-api-key.")

    @model_validator(mode="after")
    def _drop_empty_keys(self) -> Auth:
        # A blank key written in the file is refused by cross_reference_problems; one
        # that came from an empty variable is an unused slot (a chart's optional key).
        object.__setattr__(self, "api_keys", tuple(k for k in self.api_keys if k.key))
        object.__setattr__(self, "key_headers", tuple(h.lower() for h in self.key_headers))
        return self


@dataclass(frozen=True, slots=True, kw_only=True, config=SECTION)
class Admin:
    """The admin API (``/admin/*``)."""

    key: Text | None = Field(
        default=None, repr=False,
        description="Bearer key for /admin/*; write it as ${ENV_NAME}. Unset or empty: no admin "
                    "API.")


@dataclass(frozen=True, slots=True, kw_only=True, config=SECTION)
class Instance:
    """This instance's identity."""

    id: Text = Field(
        default="skyroute",
        description="Names this instance in /metrics, /health and state sync.")


@dataclass(frozen=True, slots=True, kw_only=True, config=SECTION)
class Limits:
    """Limits on what clients send and hold (defaults: nginx's or stricter)."""

    max_body_bytes: Size = Field(
        default=DEFAULT_MAX_BODY_BYTES, gt=0,
        description="Bigger JSON request bodies get 413.")
    max_upload_bytes: Size = Field(
        default=DEFAULT_MAX_UPLOAD_BYTES, gt=0,
        description="Bigger uploads (multipart and binary bodies, streamed through) get 413.")
    head_timeout_s: Duration = Field(
        default=DEFAULT_HEAD_TIMEOUT_S, validation_alias="head_timeout", gt=0,
        description="A request head not complete this long after its first byte (or the "
                    "connection) gets 408 and the connection is closed.")
    body_timeout_s: Duration = Field(
        default=DEFAULT_BODY_TIMEOUT_S, validation_alias="body_timeout", gt=0,
        description="Longest pause while a request body arrives (408, connection closed).")
    keepalive_timeout_s: Duration = Field(
        default=DEFAULT_KEEPALIVE_TIMEOUT_S, validation_alias="keepalive_timeout", gt=0,
        description="An idle kept-alive client connection is closed after this.")
    send_timeout_s: Duration = Field(
        default=DEFAULT_SEND_TIMEOUT_S, validation_alias="send_timeout", gt=0,
        description="A client that reads nothing of a streamed answer for this long is cut off "
                    "(its upstream connection is freed).")
    max_client_connections: Count = Field(
        default=DEFAULT_MAX_CLIENT_CONNECTIONS,
        description="Client connections open at once; at the cap a new one closes the one "
                    "waiting longest for a request head (503 if all are busy).")


@dataclass(frozen=True, slots=True, kw_only=True, config=SECTION)
class Upstream:
    """One upstream cluster: a provider region, or a pool of self-hosted servers."""

    name: Name = Field(description="The upstream's name, used by routes' targets.")
    provider: Provider = Field(
        default=Provider.OPENAI,
        description="The API it speaks: openai (any OpenAI-compatible API), azure, vertex or "
                    "bedrock.")
    url: HttpUrl | None = Field(
        default=None,
        description="openai: the base URL, as an SDK's base_url (give url or endpoints). azure: "
                    "the resource endpoint. vertex, bedrock: replaces the public endpoint's "
                    "scheme and host (private endpoints, tests).")
    endpoints: tuple[HttpUrl, ...] = Field(
        default=(),
        description="A local GPU pool: several OpenAI-compatible servers' base URLs.")
    api_key: Text | None = Field(
        default=None, repr=False,
        description="Sent upstream instead of the client's key; write it as ${ENV_NAME}.")
    region: Text = Field(
        default="default",
        description="Where the upstream is (in metrics and /health).")
    models: Mapping[str, str] = Field(
        default_factory=lambda: MappingProxyType({}),
        description="Model alias a client asks for -> the upstream's own model name. An alias "
                    "named by no route goes to every upstream offering it.")
    first_token_timeout_s: Duration = Field(
        default=DEFAULT_FIRST_TOKEN_TIMEOUT_S, validation_alias="first_token_timeout", gt=0,
        description="Busy detection: no first token by then fails the attempt (keep-alives do not "
                    "count).")
    connect_timeout_s: Duration = Field(
        default=DEFAULT_CONNECT_TIMEOUT_S, validation_alias="connect_timeout", gt=0,
        description="How long connecting may take.")
    idle_timeout_s: Duration = Field(
        default=DEFAULT_IDLE_TIMEOUT_S, validation_alias="idle_timeout", gt=0,
        description="Longest silence once an answer has started.")
    max_connections: Count = Field(
        default=DEFAULT_MAX_CONNECTIONS,
        description="Connections kept open to this upstream, all its endpoints together; more "
                    "requests wait (see pool_timeout).")
    pool_timeout_s: Duration = Field(
        default=DEFAULT_POOL_TIMEOUT_S, validation_alias="pool_timeout", gt=0,
        description="Longest wait for one of max_connections before the next target is tried; "
                    "the wait is not held against the upstream.")
    weight: Count = Field(default=1, description="Share of traffic under the weighted strategy.")
    scrape: Flag = Field(
        default=True,
        description="For a pool: scrape and health-check its servers (latency.scrape); false "
                    "picks by in-flight counts alone.")
    azure: AzureSettings | None = Field(
        default=None, description="provider: azure: api_version and deployments.")
    vertex: VertexSettings | None = Field(
        default=None, description="provider: vertex: project and location.")
    bedrock: BedrockSettings | None = Field(
        default=None, description="provider: bedrock: region and api.")
    auth: UpstreamAuth | None = Field(
        default=None,
        description="How skyroute authenticates: {api_key: ...}, or the cloud's identity "
                    "({entra: default}, {google: default}, {aws: default}).")
    organization: Text | None = Field(
        default=None,
        description="Sent as OpenAI-Organization (who is billed on this key).")
    project: Text | None = Field(default=None, description="Sent as OpenAI-Project.")
    forward_headers: tuple[Name, ...] = Field(
        default=(),
        description="Client headers passed to this upstream as sent that skyroute would "
                    "otherwise set itself (OpenAI-Organization, OpenAI-Project); never "
                    "credentials.")

    @model_validator(mode="after")
    def _forwardable(self) -> Upstream:
        for header in self.forward_headers:
            if header.lower() in _UNFORWARDABLE:
                raise invalid(f"forward_headers: {header!r} is a credential or hop-by-hop "
                              "header; skyroute never forwards it from a client")
        return self

    @model_validator(mode="after")
    def _provider(self) -> Upstream:
        problem = provider_problem(self.provider, url=self.url, auth=self.auth, sections={
            "azure": self.azure, "vertex": self.vertex, "bedrock": self.bedrock})
        if problem is not None:
            raise invalid(problem)
        if self.auth is not None and self.auth.api_key is not None:
            if self.api_key:
                raise invalid("give the key once: api_key or auth: {api_key: ...}, not both")
            object.__setattr__(self, "api_key", self.auth.api_key)
        if self.provider is Provider.AZURE:
            azure = self.azure or AzureSettings()
            object.__setattr__(self, "azure", azure)
            object.__setattr__(self, "models", {**azure.deployments, **self.models})
        if self.url is None and not self.endpoints:
            object.__setattr__(self, "url", default_url(self.provider, vertex=self.vertex,
                                                        bedrock=self.bedrock))
        return self

    @model_validator(mode="after")
    def _one_address(self) -> Upstream:
        if self.url is not None and self.endpoints not in ((), (self.url,)):
            raise invalid("give either 'url' or 'endpoints', not both")
        if self.url is None and not self.endpoints:
            raise invalid("needs 'url' (one server) or 'endpoints' (a pool)")
        if self.url is not None:
            object.__setattr__(self, "endpoints", (self.url,))
        object.__setattr__(self, "models", MappingProxyType(dict(self.models)))
        object.__setattr__(self, "api_key", self.api_key or None)
        object.__setattr__(self, "region", self.region or "default")
        return self

    @property
    def is_pool(self) -> bool:
        return len(self.endpoints) > 1

    def model_for(self, alias: str) -> str:
        """The upstream's own name for ``alias`` (the alias itself if not mapped)."""
        return self.models.get(alias, alias)


def _network(value: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    try:
        return ipaddress.ip_network(str(value), strict=False)
    except ValueError:
        raise invalid(f"{value!r} is not an IP address or CIDR block (e.g. 10.0.0.0/8)") \
            from None


#: An address or CIDR block (``10.0.0.0/8``, ``127.0.0.1``, ``fd00::/8``).
Network = Annotated[ipaddress.IPv4Network | ipaddress.IPv6Network, BeforeValidator(_network),
                    Kind("address or CIDR block", json_schema={"type": "string"})]


def _hedge_after(value: object) -> float | str | None:
    if value is None or (isinstance(value, str) and value.strip() == "p95"):
        return None if value is None else "p95"
    try:
        return parse_duration(value)
    except ValueError as exc:
        raise invalid(f"{exc}; or p95") from None


_HEDGE_FORMS = r"^\s*(p95|[0-9]+(\.[0-9]+)?\s*(ms|s|m|h)?)\s*$"
#: ``hedge_after``: a duration, or ``p95`` for the first target's own p95 time to first token.
HedgeAfter = Annotated[float | str | None, BeforeValidator(_hedge_after), Kind(
    "duration or p95", json_schema={"anyOf": [
        {"type": "number", "minimum": 0}, {"type": "string", "pattern": _HEDGE_FORMS},
        {"type": "null"}]})]


@dataclass(frozen=True, slots=True, kw_only=True, config=SECTION)
class Route:
    """Which upstreams serve a model alias, in preference order."""

    model: Name = Field(description="The model alias clients ask for.")
    targets: tuple[Name, ...] = Field(
        min_length=1,
        description="Upstream names, in preference order.")
    strategy: Strategy = Field(
        default=Strategy.LOWEST_LATENCY,
        description="How the healthy targets are ordered.")
    latency_threshold_s: Duration = Field(
        default=0.2, validation_alias="latency_threshold",
        description="A target slower than this (time to first token) counts as slow.")
    max_attempts: Count = Field(
        default=DEFAULT_MAX_ATTEMPTS,
        description="Attempts over the targets per request.")
    timeout_s: Duration = Field(
        default=DEFAULT_ROUTE_TIMEOUT_S, validation_alias="timeout", gt=0,
        description="Overall deadline for a request, all attempts together.")
    hedge_after: HedgeAfter = Field(
        default=None,
        description="Race the next target if no first token by then: a duration, or p95 for the "
                    "first target's own p95 time to first token.")
    resume: Flag = Field(
        default=False,
        description="Continue a stream cut after its first content byte on the next target (chat "
                    "completions).")
    fallback_model: Name | None = Field(
        default=None,
        description="Another route's model alias that serves this route's requests when none of "
                    "its targets can (e.g. a small model on a pool).")
    essential: Flag = Field(
        default=False,
        description="Still served in minimal mode (other routes are refused then).")
    cache: CacheModeValue = Field(
        default=CacheMode.OFF,
        description="Serve repeated requests from the response cache: off, exact "
                    "(deterministic requests: temperature 0 or a seed), always, or approximate "
                    "(exact, plus near-identical prompts under degradation).")
    cache_scope: CacheScope = Field(
        default=CacheScope.KEY,
        description="key: an entry is served only to the client key that stored it; shared: "
                    "to every client of the route.")
    cache_multi_turn: Flag = Field(
        default=False,
        description="With cache: approximate, multi-turn chats take part too (every earlier "
                    "message must match exactly; only the last user message may differ); by "
                    "default only single-turn requests do.")
    #: Made from upstreams' model maps, not written in YAML.
    implicit: SkipJsonSchema[bool] = dataclasses.field(default=False, init=False)


@dataclass(frozen=True, slots=True, kw_only=True, config=SECTION)
class Config:
    """A whole, validated routing file."""

    listen: ListenAddress = Field(
        default_factory=Listen,
        description="host:port to serve on (:port for all interfaces; port 0 picks a free one).")
    instance: Instance = Field(default_factory=Instance, description="This instance.")
    auth: Auth | None = Field(
        default=None,
        description="Client keys; with no auth section skyroute runs open and warns at start.")
    admin: Admin | None = Field(default=None, description="The admin API.")
    limits: Limits = Field(default_factory=Limits, description="Limits on requests.")
    retry: RetryPolicy = Field(
        default_factory=RetryPolicy,
        description="Backoff between attempts and the retry budget.")
    breaker: BreakerPolicy = Field(
        default_factory=BreakerPolicy,
        description="Circuit breaking per upstream.")
    latency: LatencyPolicy = Field(
        default_factory=LatencyPolicy,
        description="Latency sources and slow upstreams.")
    sessions: SessionPolicy = Field(
        default_factory=SessionPolicy,
        description="Session ids and how long sessions live.")
    sync: SyncPolicy | None = Field(
        default=None,
        description="State sync with peer instances; without it state stays on this instance.")
    degradation: DegradationPolicy = Field(
        default_factory=DegradationPolicy,
        description="What each degradation level switches off.")
    trusted_proxies: tuple[Network, ...] = Field(
        default=(),
        description="Load balancers in front (addresses or CIDR blocks) whose X-Forwarded-For "
                    "and X-Forwarded-Proto are kept.")
    cache: CachePolicy = Field(
        default_factory=CachePolicy,
        description="The response cache: lifetime, memory and Redis levels.")
    objects: ObjectPolicy = Field(
        default_factory=ObjectPolicy,
        description="Stateful objects (files, batches, responses, ...) stay with their upstream.")
    jobs: JobsPolicy | None = Field(
        default=None,
        description="Async requests and the Batch API run by skyroute from a durable queue; "
                    "without it /v1/async is off and /v1/batches passes through.")
    upstreams: tuple[Upstream, ...] = Field(
        min_length=1,
        description="Where requests go: cloud regions, providers, GPU pools.")
    routes: tuple[Route, ...] = Field(
        default=(),
        description="Model aliases and their targets; aliases in upstreams' models that no route "
                    "names get a route of their own.")
    #: Where the file came from (a path, or ``<memory>``).
    source: SkipJsonSchema[str] = dataclasses.field(default="<memory>", init=False)
    #: ``upstreams`` by name, made once per config: ``upstream(name)`` and
    #: ``upstream_names`` are asked per request and per health change, so they must not
    #: walk every upstream (issue 14).
    upstreams_by_name: SkipJsonSchema[Mapping[str, Upstream]] = dataclasses.field(
        default_factory=dict, init=False, repr=False, compare=False)

    @model_validator(mode="after")
    def _index_upstreams(self) -> Config:
        object.__setattr__(self, "upstreams_by_name",
                           MappingProxyType({u.name: u for u in self.upstreams}))
        return self

    @property
    def instance_id(self) -> str:
        return self.instance.id or "skyroute"

    @property
    def api_keys(self) -> tuple[ApiKey, ...] | None:
        """The client keys; None when there is no ``auth`` section (skyroute runs open)."""
        return None if self.auth is None else self.auth.api_keys

    @property
    def key_headers(self) -> tuple[str, ...]:
        """Where a client key is read from."""
        return DEFAULT_KEY_HEADERS if self.auth is None else self.auth.key_headers

    @property
    def upstream_names(self) -> Set[str]:
        return self.upstreams_by_name.keys()

    @property
    def admin_key(self) -> str | None:
        return self.admin.key or None if self.admin is not None else None

    def upstream(self, name: str) -> Upstream:
        """The upstream called ``name``; KeyError when there is none."""
        return self.upstreams_by_name[name]

    def route_for(self, model: str) -> Route | None:
        for route in self.routes:
            if route.model == model:
                return route
        return None


_CONFIG: Final = TypeAdapter(Config)


def parse_config(text: str | bytes, *, env: Mapping[str, str],
                 source: str = "<memory>") -> Config:
    """Validate a routing file given as text (bytes are read as UTF-8).

    Args:
        env: where ``${VAR}`` and ``${VAR:-default}`` expand from (the CLI passes
            ``os.environ``).
        source: the file's name, for messages.

    Raises:
        ConfigError: listing every problem found (YAML syntax, hostile input, unknown
            or duplicate keys, bad values, dangling route targets, items listed twice,
            unset ``${VAR}``),
            sorted by line.
    """
    problems: list[ConfigProblem] = []
    if isinstance(text, bytes):
        decoded, problems = decode(text)
        if decoded is None:
            raise ConfigError(source, problems)
        text = decoded
    document, problems = read_document(text, env)
    if document is None:
        raise ConfigError(source, problems)
    config: Config | None = None
    try:
        config = _CONFIG.validate_python(document.data, by_alias=True, by_name=False)
    except ValidationError as exc:
        problems += validation_problems(exc, document, Config)
    problems += cross_reference_problems(document)
    problems += repeat_problems(document)
    if problems or config is None:
        raise ConfigError(source, sorted(problems, key=lambda p: p.line or 0))
    object.__setattr__(config, "routes", config.routes + _implicit_routes(config))
    object.__setattr__(config, "source", source)
    return config


def _implicit_routes(config: Config) -> tuple[Route, ...]:
    """A route for each alias offered by upstreams but named by no route: to every
    upstream that offers it, in file order."""
    routed = {r.model for r in config.routes}
    offering: dict[str, list[str]] = {}  # alias -> its upstreams in file order (one pass)
    for upstream in config.upstreams:
        for alias in upstream.models:
            if alias not in routed:
                offering.setdefault(alias, []).append(upstream.name)
    implicit: list[Route] = []
    for alias, names in offering.items():
        route = Route(model=alias, targets=tuple(names))
        object.__setattr__(route, "implicit", True)
        implicit.append(route)
    return tuple(implicit)

