"""Which headers cross skyroute in each direction, and where a client's key is found.

Rules (RFC 9110 7.6.1 for hop-by-hop; the rest is what a gateway owes both sides):

* Hop-by-hop headers (``Connection`` and every header it names, ``Keep-Alive``,
  ``Proxy-Connection``, ``TE``, ``Trailer``, ``Transfer-Encoding``, ``Upgrade``,
  ``Proxy-Authenticate``, ``Proxy-Authorization``) are dropped in both directions;
  so are ``Host``, ``Content-Length`` and ``Expect``, which describe one message on
  one connection and are set again by aiohttp.
* A client's credentials never reach an upstream, whatever header carries them
  (``Authorization``, ``api-key``, ``x-api-key``, ``X-Goog-Api-Key``, ``Cookie``):
  the upstream gets its own configured key as ``Authorization: Bearer``.
* ``OpenAI-Organization``/``OpenAI-Project`` choose who is billed on skyroute's key,
  so they come from the upstream's ``organization``/``project``; a client's value
  passes only to an upstream that lists the header in ``forward_headers``.
* ``X-Forwarded-For``/``X-Forwarded-Proto`` (and RFC 7239 ``Forwarded``) from the
  client are kept only when the peer is in ``trusted_proxies``; the peer's address
  is then appended to ``X-Forwarded-For`` and the scheme set if it was not.
* Upstreams are asked for ``Accept-Encoding: identity`` (``_encoding`` handles one
  that compresses anyway). Answers lose hop-by-hop headers, ``Date``/``Server``
  (aiohttp writes its own), ``Set-Cookie`` (a cookie for skyroute's connection, not
  the client's) and ``x-ratelimit-*`` (they describe skyroute's key at the
  provider, not the client's: skyroute sends its own for per-key limits). The
  upstream's ``x-request-id`` comes back as ``x-upstream-request-id``.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Iterator, Mapping
from typing import Final, overload

from aiohttp import web
from multidict import CIMultiDict
from skyroute.routing import Provider, Target

HOP_BY_HOP: Final = frozenset({
    "connection", "keep-alive", "proxy-connection", "proxy-authenticate",
    "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade",
})
#: Describe one message on one connection; aiohttp sets them for the new one.
_PER_MESSAGE: Final = frozenset({"host", "content-length", "expect"})
#: Where clients put credentials; none of them ever goes upstream.
CREDENTIALS: Final = frozenset({"authorization", "api-key", "x-api-key", "x-goog-api-key",
                                "cookie"})
#: Chosen by the upstream's configuration unless its ``forward_headers`` lists them.
BILLING: Final = frozenset({"openai-organization", "openai-project"})
_FORWARDED: Final = frozenset({"x-forwarded-for", "x-forwarded-proto", "forwarded"})
#: Set per attempt by skyroute (the request id, the identity encoding).
_OURS: Final = frozenset({"x-request-id", "accept-encoding",
                          # a job's loopback call: its token and client never go upstream
                          "x-skyroute-job-token", "x-skyroute-job-client"})
_DROP_REQUEST: Final = HOP_BY_HOP | _PER_MESSAGE | CREDENTIALS | BILLING | _FORWARDED | _OURS
_DROP_RESPONSE: Final = HOP_BY_HOP | {"content-length", "date", "server", "set-cookie",
                                      "x-request-id"}
#: Headers a client key may be sent in, as the SDKs send them.
DEFAULT_KEY_HEADERS: Final = ("authorization", "api-key", "x-api-key")


class ReceivedHeaders(Mapping[str, str]):
    """An answer's headers as the lean client's parser gave them, decoded when read.

    Names are decoded (and lower-cased for lookups) in bulk; a value only when read.
    ``response_headers`` builds the client's headers straight from these, so an answer's
    headers are decoded once, not copied into a multidict first. Lookups ignore case and
    give the first of repeated headers, as ``CIMultiDict``'s; ``getall`` and ``items``
    give every one, in order.
    """

    __slots__ = ("_lower", "_names", "_values", "first")

    def __init__(self, raw: list[tuple[bytes, bytes]]) -> None:
        names, values = zip(*raw, strict=True) if raw else ((), ())
        joined = b"\n".join(names).decode("utf-8", "surrogateescape")  # names hold no "\n"
        self._names: list[str] = joined.split("\n") if raw else []
        self._lower: list[str] = joined.lower().split("\n") if raw else []
        self._values: tuple[bytes, ...] = values
        #: The first value of each lower-case name, undecoded (built in C: reversed, the
        #: first occurrence is written last).
        self.first: dict[str, bytes] = dict(zip(reversed(self._lower), reversed(values),
                                                strict=True))

    def __getitem__(self, key: str) -> str:
        value = self.first.get(key.lower())
        if value is None:
            raise KeyError(key)
        return value.decode("utf-8", "surrogateescape")

    @overload
    def get(self, key: str, /) -> str | None: ...
    @overload
    def get(self, key: str, /, default: str) -> str: ...
    @overload
    def get(self, key: str, /, default: str | None) -> str | None: ...

    def get(self, key: str, /, default: str | None = None) -> str | None:
        value = self.first.get(key.lower())
        return default if value is None else value.decode("utf-8", "surrogateescape")

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and key.lower() in self.first

    def __iter__(self) -> Iterator[str]:
        return iter(self._names)

    def __len__(self) -> int:
        return len(self._names)

    def getall(self, key: str) -> list[str]:
        """Every value of ``key``, in order (``KeyError`` if there is none, as a multidict)."""
        lower = key.lower()
        found = [value.decode("utf-8", "surrogateescape")
                 for name, value in zip(self._lower, self._values, strict=True) if name == lower]
        if not found:
            raise KeyError(key)
        return found

    def items(self) -> list[tuple[str, str]]:  # type: ignore[override]  # repeats kept
        return [(name, value.decode("utf-8", "surrogateescape"))
                for name, value in zip(self._names, self._values, strict=True)]

    def received(self) -> Iterator[tuple[str, str, bytes]]:
        """``(lower-case name, name, undecoded value)`` of each header, in order."""
        return zip(self._lower, self._names, self._values, strict=True)

    def __repr__(self) -> str:
        return f"<ReceivedHeaders({self.items()!r})>"


def connection_named(headers: Mapping[str, str]) -> set[str]:
    """The headers a ``Connection`` header names (hop-by-hop by RFC 9110 7.6.1)."""
    return {name.strip().lower() for key, value in headers.items() if key.lower() == "connection"
            for name in value.split(",") if name.strip()}


def client_key(request: web.Request, key_headers: Iterable[str]) -> str | None:
    """The client key from the first of ``key_headers`` the request carries.

    ``Authorization`` must be ``Bearer <key>``; the others carry the bare key (Azure
    SDKs send ``api-key``, several others ``x-api-key``).
    """
    for name in key_headers:
        value = request.headers.get(name, "").strip()
        if not value:
            continue
        if name.lower() == "authorization":
            scheme, _, value = value.partition(" ")
            if scheme.lower() != "bearer":
                continue
            value = value.strip()
        if value:
            return value
    return None


def bearer_token(request: web.Request) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if there is one."""
    return client_key(request, ("authorization",))


def forwarding_headers(request: web.Request,
                       trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...],
                       ) -> dict[str, str]:
    """``X-Forwarded-For``/``-Proto`` (and ``Forwarded``) for the upstream request."""
    peer = request.remote or ""
    if _is_trusted(peer, trusted):
        kept = {name: value for name in ("X-Forwarded-For", "X-Forwarded-Proto", "Forwarded")
                if (value := ", ".join(request.headers.getall(name, [])))}
    else:
        kept = {}
    chain = kept.get("X-Forwarded-For")
    if peer:
        kept["X-Forwarded-For"] = f"{chain}, {peer}" if chain else peer
    kept.setdefault("X-Forwarded-Proto", request.scheme)
    return kept


def _is_trusted(peer: str,
                trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]) -> bool:
    if not trusted or not peer:
        return False
    try:
        address = ipaddress.ip_address(peer)
    except ValueError:
        return False
    return any(address in network for network in trusted)


def request_headers(request: web.Request,
                    trusted: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (),
                    ) -> tuple[CIMultiDict[str], dict[str, str]]:
    """The client's headers that go to every upstream, and its billing headers apart.

    Returns:
        ``(headers, billing)``: ``billing`` holds the client's ``OpenAI-Organization``/
        ``OpenAI-Project``, passed only to upstreams whose ``forward_headers`` allow.
    """
    given = request.headers
    dropped = _DROP_REQUEST | connection_named(given) if "Connection" in given else _DROP_REQUEST
    headers: CIMultiDict[str] = CIMultiDict()
    billing: dict[str, str] = {}
    for name, value in given.items():  # one pass: this runs for every request
        lower = name.lower()
        if lower not in dropped:
            headers.add(name, value)
        elif lower in BILLING:
            billing[name] = value
    headers.update(forwarding_headers(request, trusted))
    return headers, billing


def upstream_headers(base: CIMultiDict[str], billing: Mapping[str, str], target: Target, *,
                     request_id: str) -> CIMultiDict[str]:
    """The headers of one attempt at ``target``: its own key, org and project."""
    upstream = target.upstream
    headers = base.copy()
    # ``base`` never holds these (``request_headers`` drops them): add, no search.
    headers.add("X-Request-ID", request_id)
    headers.add("Accept-Encoding", "identity")
    if upstream.api_key:  # Azure takes its key in api-key; everyone else as a Bearer token
        if upstream.provider is Provider.AZURE:
            headers.add("api-key", upstream.api_key)
        else:
            headers.add("Authorization", f"Bearer {upstream.api_key}")
    if billing:
        allowed = {h.lower() for h in upstream.forward_headers}
        for name, value in billing.items():
            if name.lower() in allowed:
                headers[name] = value
    if upstream.organization and "openai-organization" not in headers:
        headers["OpenAI-Organization"] = upstream.organization
    if upstream.project and "openai-project" not in headers:
        headers["OpenAI-Project"] = upstream.project
    return headers


def response_headers(upstream: Mapping[str, str], request_id: str, target: Target,
                     extra: Mapping[str, str] | None = None, *,
                     decoded: bool = False) -> CIMultiDict[str]:
    """The client's headers for an upstream's answer.

    Args:
        decoded: skyroute decoded the body (see ``_encoding``), so its
            ``Content-Encoding`` no longer applies.
    """
    dropped = _DROP_RESPONSE | connection_named(upstream) if "connection" in upstream \
        else _DROP_RESPONSE
    if decoded:
        dropped = dropped | {"content-encoding"}
    headers: CIMultiDict[str]
    if isinstance(upstream, ReceivedHeaders):  # the lean client's: decoded here, once
        headers = CIMultiDict([(name, value.decode("utf-8", "surrogateescape"))
                               for lower, name, value in upstream.received()
                               if lower not in dropped and not lower.startswith("x-ratelimit-")])
    else:
        headers = CIMultiDict()
        for name, text in upstream.items():
            lower = name.lower()
            if lower not in dropped and not lower.startswith("x-ratelimit-"):
                headers.add(name, text)
    upstream_id = upstream.get("x-request-id")
    if upstream_id:
        headers["X-Upstream-Request-ID"] = upstream_id
    headers["X-Request-ID"] = request_id
    headers["X-Skyroute-Upstream"] = target.name
    headers.update(extra or {})  # e.g. X-Skyroute-Degraded for a fallback answer
    return headers
