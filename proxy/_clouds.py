"""Reaching cloud upstreams: their URLs, their identity, and (Bedrock) their API.

Theory of operation:

* ``UpstreamAccess`` is what one upstream of ``provider: azure | vertex | bedrock``
  needs beyond a connection: ``prepare`` turns one attempt's OpenAI-shaped request
  into the provider's (path from ``routing.provider_path``, credential headers, a
  SigV4 signature, a Converse body) and ``answer`` turns the provider's answer back
  into OpenAI's shape where it differs (Bedrock's Converse API and error bodies).
  Plain ``provider: openai`` upstreams have none and pay nothing.
* Credentials the cloud issues (Entra ID and Google OAuth tokens, AWS credentials
  from botocore's chain) are kept by a ``RefreshedCredential``: one background task
  per upstream fetches them through the cloud's own library (in a thread: those
  libraries block) and fetches again well before they expire, so no request waits
  for a token once the first has come, and two refreshes never run at once. A fetch
  that fails is logged once per failure streak with the provider and what to check,
  never the secret, and retried with capped backoff; attempts meanwhile fail as
  ``bad_key`` without reaching the upstream, so routing fails over.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import datetime
import json
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Generic, TypeVar

import aiohttp
import structlog
from multidict import CIMultiDict, CIMultiDictProxy
from prometheus_client import CollectorRegistry, Counter, Gauge
from skyroute.routing import BedrockApi, Provider, Upstream, provider_path
from yarl import URL

from ._bedrock import (
    ConverseStreamTranslator,
    TranslationError,
    chat_completion,
    converse_request,
    openai_error,
)
from ._bounded_read import MAX_ERROR_BODY, read_at_most

log = structlog.get_logger("skyroute.clouds")

#: Entra ID scope of Azure OpenAI / AI Foundry data-plane calls.
AZURE_SCOPE: Final = "https://cognitiveservices.azure.com/.default"
#: OAuth scope Vertex AI accepts.
GOOGLE_SCOPE: Final = "https://www.googleapis.com/auth/cloud-platform"
#: A credential is fetched again this long before it expires, or at half its lifetime
#: if that is sooner (short-lived test tokens).
REFRESH_AHEAD_S: Final = 300.0
#: AWS credentials are re-read this often; botocore itself refreshes temporary ones
#: (IRSA, instance roles) well before they expire.
AWS_RECHECK_S: Final = 60.0
#: How long an attempt waits for a credential that is being fetched.
CREDENTIAL_WAIT_S: Final = 10.0
#: Backoff between failed fetches: 1 s, doubling, capped.
FETCH_BACKOFF_CAP_S: Final = 30.0
#: Bound on one token request made by the clouds' libraries.
FETCH_TIMEOUT_S: Final = 10.0

#: What to check when a provider's credential cannot be had, by auth kind.
CREDENTIAL_HINTS: Final = {
    "entra": "check the pod's Azure workload identity (azure.workload.identity/use label, "
             "AZURE_CLIENT_ID) or AZURE_* environment; the identity needs the "
             "'Cognitive Services OpenAI User' role on the resource",
    "google": "check GOOGLE_APPLICATION_CREDENTIALS or the GKE workload identity binding; the "
              "service account needs roles/aiplatform.user on the project",
    "aws": "check AWS_* environment, AWS_PROFILE or the IRSA role of the service account; "
           "the role needs bedrock:InvokeModel and bedrock:InvokeModelWithResponseStream",
}

T = TypeVar("T")


def credential_hint(upstream: Upstream, error_type: str = "") -> str:
    """What to check when a cloud upstream refuses our identity (401/403), never the secret."""
    kind = upstream.auth.kinds[0] if upstream.auth is not None else "api_key"
    hint = CREDENTIAL_HINTS.get(kind, "check the key in auth.api_key (or api_key)")
    refused = f" ({error_type.partition(':')[0]})" if error_type else ""
    return f"provider {upstream.provider.value} refused the {kind} credential{refused}: {hint}"


class CredentialUnavailable(Exception):
    """No valid credential for an upstream right now; the message says what to check."""


class RefreshedCredential(Generic[T]):
    """A credential fetched by a blocking ``fetch`` and kept fresh by one background task.

    ``fetch`` returns the credential and the wall-clock time it expires at.
    """

    def __init__(self, upstream: str, provider: str, kind: str,
                 fetch: Callable[[], tuple[T, float]], *,
                 on_fetch: Callable[[bool], None] | None = None,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.upstream, self.provider, self.kind = upstream, provider, kind
        self._fetch = fetch
        self._on_fetch = on_fetch or (lambda ok: None)
        self._now = wall_clock
        self._value: T | None = None
        self._expires_at = 0.0
        self._fresh = asyncio.Event()
        self._problem: str | None = None
        self._task: asyncio.Task[None] | None = None
        self.refreshes = 0
        self.failures = 0

    def start(self) -> None:
        """Start fetching in the background (idempotent)."""
        if self._task is None:
            # A fresh context: the request that happened to start it is not its request.
            self._task = asyncio.get_running_loop().create_task(
                self._refresh_forever(), name=f"credential {self.upstream}",
                context=contextvars.Context())

    async def aclose(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    @property
    def valid(self) -> bool:
        """A credential is held and has not expired."""
        return self._value is not None and self._now() < self._expires_at

    async def get(self) -> T:
        """The current credential; waits (bounded) only when none is valid yet.

        Raises:
            CredentialUnavailable: none came within ``CREDENTIAL_WAIT_S``.
        """
        if self._value is not None and self._now() < self._expires_at:
            return self._value
        self.start()
        self._fresh.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CREDENTIAL_WAIT_S):  # not wait_for: it can lose a cancel
                await self._fresh.wait()
        if self._value is not None and self._now() < self._expires_at:
            return self._value
        raise CredentialUnavailable(self._problem or f"no {self.kind} credential yet "
                                    f"after {CREDENTIAL_WAIT_S:g}s")

    async def _refresh_forever(self) -> None:
        backoff = 1.0
        while True:
            try:
                value, expires_at = await asyncio.to_thread(self._fetch)
            except Exception as exc:  # any library failure is a credential problem
                self.failures += 1
                self._on_fetch(False)
                problem = (f"provider {self.provider}: cannot get {self.kind} credentials "
                           f"({type(exc).__name__}); {CREDENTIAL_HINTS.get(self.kind, '')}")
                if problem != self._problem:
                    log.error("credential_failed", upstream=self.upstream,
                              provider=self.provider, auth=self.kind,
                              error=type(exc).__name__, hint=CREDENTIAL_HINTS.get(self.kind))
                self._problem = problem
                self._fresh.set()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, FETCH_BACKOFF_CAP_S)
                continue
            if self._problem is not None:
                log.info("credential_recovered", upstream=self.upstream, provider=self.provider)
            self._value, self._expires_at, self._problem = value, expires_at, None
            self.refreshes += 1
            self._on_fetch(True)
            backoff = 1.0
            self._fresh.set()
            lifetime = max(0.0, expires_at - self._now())
            await asyncio.sleep(max(0.5, lifetime - min(REFRESH_AHEAD_S, lifetime / 2)))


def _google_fetcher() -> Callable[[], tuple[str, float]]:
    import google.auth
    import google.auth.transport.requests

    class _Request(google.auth.transport.requests.Request):
        def __call__(self, *args: Any, **kwargs: Any) -> Any:
            kwargs["timeout"] = FETCH_TIMEOUT_S
            return super().__call__(*args, **kwargs)

    state: dict[str, Any] = {}

    def fetch() -> tuple[str, float]:
        if "credentials" not in state:
            state["credentials"], _ = google.auth.default(scopes=[GOOGLE_SCOPE])
        credentials = state["credentials"]
        credentials.refresh(_Request())
        expiry = credentials.expiry  # naive UTC
        expires_at = (expiry.replace(tzinfo=datetime.UTC).timestamp() if expiry is not None
                      else time.time() + 3600)
        return credentials.token, expires_at

    return fetch


def _entra_fetcher() -> Callable[[], tuple[str, float]]:
    from azure.identity import DefaultAzureCredential

    state: dict[str, Any] = {}

    def fetch() -> tuple[str, float]:
        if "credential" not in state:
            state["credential"] = DefaultAzureCredential()
        token = state["credential"].get_token(AZURE_SCOPE)
        return token.token, float(token.expires_on)

    return fetch


def _aws_fetcher() -> Callable[[], tuple[Any, float]]:
    import botocore.session

    state: dict[str, Any] = {}

    def fetch() -> tuple[Any, float]:
        if "credentials" not in state:
            credentials = botocore.session.Session().get_credentials()
            if credentials is None:
                raise LookupError("botocore found no AWS credentials")
            state["credentials"] = credentials
        return state["credentials"].get_frozen_credentials(), time.time() + AWS_RECHECK_S

    return fetch


@dataclass(slots=True)
class Prepared:
    """One attempt's request as the provider wants it."""

    url: URL
    data: Any
    translate: bool  # the answer comes back in Bedrock's Converse shape


class UpstreamAccess:
    """How requests reach one cloud upstream (see the module docstring)."""

    def __init__(self, upstream: Upstream,
                 credential: RefreshedCredential[Any] | None = None) -> None:
        self.upstream = upstream
        self.credential = credential

    @classmethod
    def for_upstream(cls, upstream: Upstream, *,
                     on_fetch: Callable[[bool], None] | None = None) -> UpstreamAccess | None:
        """The access an upstream needs; ``None`` for a plain OpenAI-compatible one."""
        if upstream.provider is Provider.OPENAI:
            return None
        kind = upstream.auth.kinds[0] if upstream.auth is not None else "api_key"
        credential = None
        if kind != "api_key":
            try:
                fetch = FETCHERS[kind]()
            except ImportError:
                extra = upstream.provider.value
                raise RuntimeError(
                    f"upstream {upstream.name!r} (provider: {extra}, auth: {kind}) needs "
                    f"{extra}'s identity library: pip install 'skyroute[{extra}]'") from None
            credential = RefreshedCredential(upstream.name, upstream.provider.value, kind,
                                             fetch, on_fetch=on_fetch)
        return cls(upstream, credential)

    def start(self) -> None:
        if self.credential is not None:
            self.credential.start()

    async def aclose(self) -> None:
        if self.credential is not None:
            await self.credential.aclose()

    async def prepare(self, *, method: str, endpoint: str, path_qs: str, model: str,
                      headers: CIMultiDict[str], data: Any,
                      payload: Mapping[str, Any] | None) -> Prepared:
        """The provider's URL and body for one attempt; sets credential headers.

        Raises:
            CredentialUnavailable: no credential to send (the attempt is ``bad_key``).
            TranslationError: the request cannot be expressed for this provider (the client's
                request is wrong for it; the message names the field).
        """
        upstream = self.upstream
        stream = bool(payload and payload.get("stream"))
        path = provider_path(upstream.provider, path_qs, model=model, stream=stream,
                             azure=upstream.azure, vertex=upstream.vertex,
                             bedrock=upstream.bedrock)
        if path is None:
            raise TranslationError(
                f"{path_qs.partition('?')[0]} is not served by Bedrock's Converse API (only "
                "/chat/completions); set bedrock: {api: openai} for its OpenAI-compatible "
                "endpoint")
        url = URL(str(URL(endpoint)).rstrip("/") + path, encoded=True)
        translate = (upstream.provider is Provider.BEDROCK and upstream.bedrock is not None
                     and upstream.bedrock.api is BedrockApi.CONVERSE)
        if translate:
            if payload is None:
                raise TranslationError("Bedrock's Converse API needs a JSON chat completions body")
            data = json.dumps(converse_request(payload)).encode()
            headers["Content-Type"] = "application/json"
            headers.pop("Content-Length", None)
        if self.credential is not None:
            value = await self.credential.get()
            if upstream.provider is Provider.BEDROCK:
                _sign_sigv4(value, upstream.bedrock.region if upstream.bedrock else "",
                            method, url, headers, data)
            else:
                headers["Authorization"] = f"Bearer {value}"
        return Prepared(url=url, data=data, translate=translate)


def _sign_sigv4(credentials: Any, region: str, method: str, url: URL,
                headers: CIMultiDict[str], data: Any) -> None:
    """Add SigV4 headers (botocore's signer) for ``bedrock`` in ``region``."""
    from botocore.auth import SigV4Auth
    from botocore.awsrequest import AWSRequest

    body = data if isinstance(data, bytes) else b""
    # Only headers that reach the server unchanged are signed; aiohttp sets Host from the URL.
    signed = {"Content-Type": headers.get("Content-Type", "application/json")}
    request = AWSRequest(method=method, url=str(url), data=body, headers=signed)
    SigV4Auth(credentials, "bedrock", region).add_auth(request)
    for name in ("Authorization", "X-Amz-Date", "X-Amz-Security-Token",
                 "X-Amz-Content-SHA256"):
        if name in request.headers:
            headers[name] = request.headers[name]


FETCHERS: Final[dict[str, Callable[[], Callable[[], tuple[Any, float]]]]] = {
    "google": _google_fetcher,
    "entra": _entra_fetcher,
    "aws": _aws_fetcher,
}


class _Content:
    """The ``content`` of a translated answer: what ``proxy._forward`` reads."""

    def __init__(self, answer: ConverseAnswer) -> None:
        self._answer = answer

    async def readany(self) -> bytes:
        return await self._answer.next_chunk()

    async def read(self, n: int = -1) -> bytes:
        return await self._answer.read()

    def iter_any(self) -> _Chunks:
        return _Chunks(self._answer)


class _Chunks:
    def __init__(self, answer: ConverseAnswer) -> None:
        self._answer = answer

    def __aiter__(self) -> _Chunks:
        return self

    async def __anext__(self) -> bytes:
        chunk = await self._answer.next_chunk()
        if not chunk:
            raise StopAsyncIteration
        return chunk


class ConverseAnswer:
    """A Bedrock Converse answer that reads like an OpenAI one (status, headers, body)."""

    def __init__(self, response: aiohttp.ClientResponse, *, model: str,
                 payload: Mapping[str, Any]) -> None:
        self._response = response
        self.status = response.status
        self._model = model
        self._id = "chatcmpl-" + secrets.token_hex(12)
        self._stream = bool(payload.get("stream")) and response.status < 400
        options = payload.get("stream_options")
        self._translator = ConverseStreamTranslator(
            model=model, completion_id=self._id,
            include_usage=isinstance(options, Mapping) and bool(options.get("include_usage")))
        headers = CIMultiDict((k, v) for k, v in response.headers.items()
                              if k.lower() not in ("content-type", "content-length"))
        headers["Content-Type"] = ("text/event-stream" if self._stream
                                   else "application/json")
        self.headers = CIMultiDictProxy(headers)
        self.content_type = headers["Content-Type"]
        self.content = _Content(self)
        self._read = False

    @property
    def error_type(self) -> str:
        """Bedrock's error type (``ThrottlingException``...), from ``x-amzn-ErrorType``."""
        return self._response.headers.get("x-amzn-ErrorType", "").partition(":")[0]

    async def next_chunk(self) -> bytes:
        """The next translated bytes; ``b""`` at the end (or after an exception frame)."""
        if not self._stream:
            if self._read:
                return b""
            return await self.read()
        while True:
            data = await self._response.content.readany()
            if not data:
                return b""
            try:
                out = self._translator.feed(data)
            except ValueError as exc:  # a frame that fails its checksum: trust nothing after
                raise aiohttp.ClientPayloadError(str(exc)) from None
            if self._translator.error is not None:
                raise aiohttp.ClientPayloadError(
                    f"Bedrock stream exception {self._translator.error}")
            if out:
                return out

    async def read(self) -> bytes:
        """The whole translated body (non-streaming answers and errors)."""
        if self._read:
            return b""
        self._read = True
        if self.status >= 400:
            body = await read_at_most(self._response, MAX_ERROR_BODY)
            return openai_error(self.status, body, self.error_type)
        body = await self._response.read()
        try:
            answer = json.loads(body)
        except ValueError as exc:
            raise aiohttp.ClientPayloadError("Bedrock answered with a body that is not JSON") \
                from exc
        return json.dumps(chat_completion(answer, model=self._model,
                                          completion_id=self._id)).encode()

    def release(self) -> None:
        self._response.release()

    def close(self) -> None:
        self._response.close()


class CloudAccess:
    """The ``UpstreamAccess`` of every cloud upstream, started once and closed at shutdown."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self._access: dict[str, UpstreamAccess] = {}
        self._retired: list[UpstreamAccess] = []
        self._fetches = Counter(
            "skyroute_cloud_credential_fetches_total",
            "Credentials fetched from a cloud's identity service (Entra ID, Google OAuth, "
            "AWS), by upstream and result (ok, failed).",
            ["upstream", "provider", "result"], registry=registry)
        self._valid = Gauge(
            "skyroute_cloud_credential_valid",
            "1 while the upstream's last credential fetch succeeded, 0 after a failure.",
            ["upstream", "provider"], registry=registry)

    def for_upstream(self, upstream: Upstream) -> UpstreamAccess | None:
        """The access of ``upstream``; a reload that changed it gets a new one."""
        if upstream.provider is Provider.OPENAI:
            return None
        access = self._access.get(upstream.name)
        if access is not None and access.upstream == upstream:
            return access
        if access is not None:
            self._retired.append(access)  # requests in flight may still hold it
        labels = (upstream.name, upstream.provider.value)

        def on_fetch(ok: bool) -> None:
            self._fetches.labels(*labels, "ok" if ok else "failed").inc()
            self._valid.labels(*labels).set(1 if ok else 0)

        access = UpstreamAccess.for_upstream(upstream, on_fetch=on_fetch)
        assert access is not None
        access.start()
        self._access[upstream.name] = access
        return access

    def start(self, upstreams: Iterable[Upstream]) -> None:
        """Begin fetching every cloud upstream's credentials, so none waits at first use."""
        for upstream in upstreams:
            self.for_upstream(upstream)

    def health(self) -> dict[str, dict[str, Any]]:
        """Per cloud upstream: its provider and, for an identity, whether it is valid now."""
        report: dict[str, dict[str, Any]] = {}
        for name, access in self._access.items():
            entry: dict[str, Any] = {"provider": access.upstream.provider.value}
            if access.credential is not None:
                entry["credential"] = {"auth": access.credential.kind,
                                       "valid": access.credential.valid}
            report[name] = entry
        return report

    async def aclose(self) -> None:
        accesses = [*self._access.values(), *self._retired]
        self._access, self._retired = {}, []
        for access in accesses:
            await access.aclose()


__all__ = [
    "CloudAccess",
    "ConverseAnswer",
    "CredentialUnavailable",
    "Prepared",
    "RefreshedCredential",
    "UpstreamAccess",
    "credential_hint",
]
