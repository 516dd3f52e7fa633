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
from collections.abc import Iterable, Mapping
from typing import Final

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
_OURS: Final = frozenset({"x-request-id", "accept-encoding"})
_DROP_REQUEST: Final = HOP_BY_HOP | _PER_MESSAGE | CREDENTIALS | BILLING | _FORWARDED | _OURS
_DROP_RESPONSE: Final = HOP_BY_HOP | {"content-length", "date", "server", "set-cookie",
                                      "x-request-id"}
#: Headers a client key may be sent in, as the SDKs send them.
DEFAULT_KEY_HEADERS: Final = ("authorization", "api-key", "x-api-key")


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
    headers: CIMultiDict[str] = CIMultiDict()
    for name, value in upstream.items():
        lower = name.lower()
        if lower not in dropped and not lower.startswith("x-ratelimit-"):
            headers.add(name, value)
    upstream_id = upstream.get("x-request-id")
    if upstream_id:
        headers["X-Upstream-Request-ID"] = upstream_id
    headers["X-Request-ID"] = request_id
    headers["X-Skyroute-Upstream"] = target.name
    headers.update(extra or {})  # e.g. X-Skyroute-Degraded for a fallback answer
    return headers
