"""Stand-ins for Azure OpenAI, Vertex AI (with Google's OAuth token endpoint) and Bedrock.

Each checks what the real service checks before it answers:

* ``AzureStandin``: the deployment path and a known ``api-version`` (or the v1 path), and
  the ``api-key`` header or an Entra bearer token it accepts. It answers through an
  inner ``StandinUpstream`` (so its faults apply), adding Azure's ``retry-after-ms``.
* ``GoogleTokenEndpoint``: an OAuth token endpoint for service-account credentials. It
  verifies the JWT assertion against the test key pair it made, and issues short-lived
  access tokens; ``service_account_info`` is the JSON file google-auth reads.
* ``VertexStandin``: the project/location path of Vertex's OpenAI-compatible endpoint,
  and only a current token from that endpoint; answers through an inner stand-in.
* ``BedrockStandin``: recomputes every request's SigV4 signature with botocore from the
  same test credentials (a wrong signature or a date more than 5 minutes off is refused,
  as AWS does) and answers Converse and ConverseStream itself, the stream in real
  ``application/vnd.amazon.eventstream`` frames (``event_frame``).
"""

from __future__ import annotations

import asyncio
import binascii
import datetime
import json
import secrets
import struct
import time
from collections.abc import Mapping
from typing import Any

import aiohttp
from aiohttp import web

from ._standin import StandinUpstream

#: The audience google-auth puts in a service account's JWT, and Google's endpoint wants.
GOOGLE_TOKEN_AUDIENCE = "https://oauth2.googleapis.com/token"
#: AWS refuses a signature whose date is further than this from its clock.
SIGV4_SKEW_S = 300.0


class _Server:
    """An aiohttp app on a free 127.0.0.1 port."""

    def __init__(self) -> None:
        self.app = web.Application()
        self._runner: web.AppRunner | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._runner = web.AppRunner(self.app, access_log=None, shutdown_timeout=0.5)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", 0).start()
        self.port = int(self._runner.addresses[0][1])

    async def aclose(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> Any:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


def _error(status: int, message: str, code: str) -> web.Response:
    return web.json_response({"error": {"message": message, "type": "invalid_request_error",
                                        "param": None, "code": code}}, status=status)


async def _relay(request: web.Request, inner: StandinUpstream, path: str,
                 body: dict[str, Any], extra: Mapping[str, str] | None = None
                 ) -> web.StreamResponse:
    """Answer with what ``inner`` answers at ``path`` (status, headers, body as it streams)."""
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(timeout=timeout) as http, http.post(
            f"{inner.base_url}{path}", json=body,
            headers={"Authorization": f"Bearer {inner.api_key or 'x'}"}) as upstream:
        headers = {k: v for k, v in upstream.headers.items()
                   if k.lower() in ("content-type", "retry-after", "x-request-id")}
        if upstream.status == 429 and "Retry-After" in upstream.headers:
            headers["retry-after-ms"] = str(int(float(upstream.headers["Retry-After"]) * 1000))
        headers.update(extra or {})
        resp = web.StreamResponse(status=upstream.status, headers=headers)
        await resp.prepare(request)
        async for chunk in upstream.content.iter_any():
            await resp.write(chunk)
        await resp.write_eof()
        return resp


#: Azure's answer to a prompt its content filter blocks (HTTP 400).
AZURE_CONTENT_FILTER = {"error": {
    "message": "The response was filtered due to the prompt triggering Azure OpenAI's content "
               "management policy.",
    "type": None, "param": "prompt", "code": "content_filter", "status": 400,
    "innererror": {"code": "ResponsibleAIPolicyViolation", "content_filter_result": {
        "violence": {"filtered": True, "severity": "high"}}}}}


class AzureStandin(_Server):
    """Azure OpenAI in front of ``inner``; ``deployments`` maps a deployment to a model.

    A prompt containing ``blocked_word`` gets Azure's content-filter 400.
    """

    blocked_word = "forbidden"

    API_VERSIONS = frozenset({"2024-10-21", "2024-06-01", "2025-01-01-preview"})

    def __init__(self, inner: StandinUpstream, *, api_key: str | None = None,
                 tokens: set[str] | None = None, deployments: Mapping[str, str]) -> None:
        super().__init__()
        self.inner, self.api_key = inner, api_key
        self.tokens = tokens if tokens is not None else set()
        self.deployments = dict(deployments)
        self.requests: list[str] = []  # path?query of every request that passed the checks
        self.last_headers: Mapping[str, str] = {}
        self.app.router.add_post("/openai/deployments/{deployment}/chat/completions",
                                 self._deployment)
        self.app.router.add_post("/openai/v1/chat/completions", self._v1)

    def _refusal(self, request: web.Request) -> web.Response | None:
        self.last_headers = request.headers
        key = request.headers.get("api-key")
        bearer = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if (key is not None and key == self.api_key) or bearer in self.tokens:
            return None
        return _error(401, "Access denied due to invalid subscription key or wrong API "
                      "endpoint. Make sure to provide a valid key for an active subscription "
                      "and use a correct regional API endpoint for your resource.", "401")

    async def _deployment(self, request: web.Request) -> web.StreamResponse:
        refused = self._refusal(request)
        if refused is not None:
            return refused
        version = request.query.get("api-version")
        if version not in self.API_VERSIONS:
            return _error(404, "Resource not found" if version is None
                          else f"Unsupported api-version {version}", "404")
        model = self.deployments.get(request.match_info["deployment"])
        if model is None:
            return _error(404, "The API deployment for this resource does not exist.",
                          "DeploymentNotFound")
        self.requests.append(request.path_qs)
        body = await request.json()
        if self.blocked_word in json.dumps(body.get("messages")):
            return web.json_response(AZURE_CONTENT_FILTER, status=400)
        return await _relay(request, self.inner, "/chat/completions", {**body, "model": model})

    async def _v1(self, request: web.Request) -> web.StreamResponse:
        refused = self._refusal(request)
        if refused is not None:
            return refused
        body = await request.json()
        model = self.deployments.get(body.get("model", ""))
        if model is None:
            return _error(404, "The API deployment for this resource does not exist.",
                          "DeploymentNotFound")
        self.requests.append(request.path_qs)
        return await _relay(request, self.inner, "/chat/completions", {**body, "model": model})


class GoogleTokenEndpoint(_Server):
    """Google's OAuth 2.0 token endpoint for service accounts, with its own test key pair."""

    def __init__(self, *, lifetime_s: float = 3600.0) -> None:
        super().__init__()
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import rsa

        key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        self.private_pem = key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption()).decode()
        self.public_pem = key.public_key().public_bytes(
            serialization.Encoding.PEM,
            serialization.PublicFormat.SubjectPublicKeyInfo).decode()
        self.lifetime_s = lifetime_s
        self.client_email = "skyroute-test@test-project.iam.gserviceaccount.com"
        self.issued: dict[str, float] = {}  # access token -> when it expires (time.time)
        self.requests = 0
        self.in_flight = self.max_in_flight = 0
        self.app.router.add_post("/token", self._token)

    def service_account_info(self) -> dict[str, str]:
        """The service-account JSON (GOOGLE_APPLICATION_CREDENTIALS) pointing here."""
        return {"type": "service_account", "project_id": "test-project",
                "private_key_id": "test-key", "private_key": self.private_pem,
                "client_email": self.client_email, "client_id": "1",
                "token_uri": f"{self.url}/token"}

    def is_current(self, token: str) -> bool:
        return self.issued.get(token, 0.0) > time.time()

    async def _token(self, request: web.Request) -> web.Response:
        from google.auth import jwt

        self.requests += 1
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            form = await request.post()
            if form.get("grant_type") != "urn:ietf:params:oauth:grant-type:jwt-bearer":
                return web.json_response({"error": "unsupported_grant_type"}, status=400)
            try:
                claims = jwt.decode(str(form.get("assertion", "")), certs=self.public_pem,
                                    audience=GOOGLE_TOKEN_AUDIENCE)
            except ValueError as exc:
                return web.json_response({"error": "invalid_grant",
                                          "error_description": str(exc)}, status=400)
            if claims.get("iss") != self.client_email:
                return web.json_response({"error": "invalid_grant"}, status=400)
            token = "ya29.test-" + secrets.token_urlsafe(24)
            self.issued[token] = time.time() + self.lifetime_s
            return web.json_response({"access_token": token, "token_type": "Bearer",
                                      "expires_in": self.lifetime_s})
        finally:
            self.in_flight -= 1


class VertexStandin(_Server):
    """Vertex AI's OpenAI-compatible endpoint for one project/location, in front of ``inner``."""

    def __init__(self, inner: StandinUpstream, tokens: GoogleTokenEndpoint, *, project: str,
                 location: str) -> None:
        super().__init__()
        self.inner, self.tokens = inner, tokens
        self.requests: list[str] = []
        self.refused = 0
        self.exhausted = False  # answer 429 RESOURCE_EXHAUSTED, as Vertex does over quota
        self.app.router.add_post(f"/v1/projects/{project}/locations/{location}/endpoints/"
                                 "openapi/chat/completions", self._chat)

    async def _chat(self, request: web.Request) -> web.StreamResponse:
        token = request.headers.get("Authorization", "").removeprefix("Bearer ")
        if not self.tokens.is_current(token):
            self.refused += 1
            return web.json_response({"error": {
                "code": 401, "status": "UNAUTHENTICATED",
                "message": "Request had invalid authentication credentials."}}, status=401)
        self.requests.append(request.path)
        if self.exhausted:
            return web.json_response([{"error": {
                "code": 429, "status": "RESOURCE_EXHAUSTED",
                "message": "Resource exhausted. Please try again later."}}], status=429)
        return await _relay(request, self.inner, "/chat/completions", await request.json())


def event_frame(headers: Mapping[str, str], payload: bytes) -> bytes:
    """One ``application/vnd.amazon.eventstream`` frame with string headers."""
    encoded = b"".join(
        struct.pack("B", len(name.encode())) + name.encode() + b"\x07"
        + struct.pack(">H", len(value.encode())) + value.encode()
        for name, value in headers.items())
    total = 12 + len(encoded) + len(payload) + 4
    prelude = struct.pack(">II", total, len(encoded))
    prelude += struct.pack(">I", binascii.crc32(prelude) & 0xFFFFFFFF)
    message = prelude + encoded + payload
    return message + struct.pack(">I", binascii.crc32(message) & 0xFFFFFFFF)


def _event(kind: str, body: Mapping[str, Any]) -> bytes:
    return event_frame({":event-type": kind, ":content-type": "application/json",
                        ":message-type": "event"}, json.dumps(body).encode())


class BedrockStandin(_Server):
    """Bedrock Runtime's Converse and ConverseStream for ``models``, SigV4-checked.

    ``mode``: ``ok``; ``throttled`` (429 ThrottlingException); ``unavailable`` (503
    ServiceUnavailableException); ``stream_exception`` (a ConverseStream that sends a
    throttlingException frame right after ``messageStart``, before any content);
    ``huge_error`` (a 400 ValidationException whose JSON body is ``HUGE_ERROR_BYTES``
    long, sent in pieces; ``error_bytes_sent`` counts what got out before the reader
    closed the connection, and ``error_body_ended`` is set when the handler is done).
    """

    #: Size of the ``huge_error`` body: far past any reader's limit plus the socket
    #: buffers of both ends (up to 32 MiB on Linux), so "not read whole" is visible.
    HUGE_ERROR_BYTES = 64 * 1024 * 1024

    def __init__(self, name: str, *, access_key: str, secret_key: str, region: str,
                 models: tuple[str, ...], inner: StandinUpstream | None = None) -> None:
        super().__init__()
        self.name, self.region, self.models, self.inner = name, region, models, inner
        self.access_key, self.secret_key = access_key, secret_key
        self.mode = "ok"
        self.requests: list[dict[str, Any]] = []  # Converse bodies that passed the checks
        self.refused: list[str] = []  # why signature checks failed
        self.error_bytes_sent = 0
        self.error_body_ended = asyncio.Event()
        self.app.router.add_post("/model/{model}/converse", self._converse)
        self.app.router.add_post("/model/{model}/converse-stream", self._converse_stream)
        # Bedrock's OpenAI-compatible endpoint (bedrock: {api: openai}), answered by ``inner``.
        self.app.router.add_post("/openai/v1/chat/completions", self._openai)

    def _signature_problem(self, request: web.Request, body: bytes) -> str | None:
        from botocore.auth import SigV4Auth
        from botocore.awsrequest import AWSRequest
        from botocore.credentials import Credentials

        auth = request.headers.get("Authorization", "")
        if not auth.startswith("AWS4-HMAC-SHA256 "):
            return "MissingAuthenticationTokenException"
        fields = dict(part.strip().split("=", 1) for part in
                      auth.removeprefix("AWS4-HMAC-SHA256 ").split(","))
        scope = fields.get("Credential", "").split("/")
        if len(scope) != 5 or scope[0] != self.access_key:
            return "UnrecognizedClientException"
        if scope[2] != self.region or scope[3] != "bedrock":
            return "InvalidSignatureException: wrong region or service in the scope"
        amz_date = request.headers.get("X-Amz-Date", "")
        try:
            when = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ").replace(
                tzinfo=datetime.UTC)
        except ValueError:
            return "InvalidSignatureException: no X-Amz-Date"
        if abs(when.timestamp() - time.time()) > SIGV4_SKEW_S:
            return "InvalidSignatureException: Signature expired"
        signed = fields.get("SignedHeaders", "").split(";")
        headers = {name: request.headers.get(name, "") for name in signed if name != "host"}
        url = f"http://{request.host}{request.raw_path}"
        replay = AWSRequest(method=request.method, url=url, data=body, headers=headers)
        replay.context["timestamp"] = amz_date
        signer = SigV4Auth(Credentials(self.access_key, self.secret_key), "bedrock",
                           self.region)
        canonical = signer.canonical_request(replay)
        expected = signer.signature(signer.string_to_sign(replay, canonical), replay)
        if not secrets.compare_digest(expected, fields.get("Signature", "")):
            return ("InvalidSignatureException: The request signature we calculated does not "
                    "match the signature you provided")
        return None

    async def _checked(self, request: web.Request) -> dict[str, Any] | web.StreamResponse:
        body = await request.read()
        problem = self._signature_problem(request, body)
        if problem is not None:
            self.refused.append(problem)
            kind, _, message = problem.partition(": ")
            return web.json_response({"message": message or kind}, status=403,
                                     headers={"x-amzn-ErrorType": f"{kind}:http://internal"})
        model = request.match_info.get("model") or json.loads(body).get("model")
        if model not in self.models:
            return web.json_response({"message": "The provided model identifier is invalid."},
                                     status=400,
                                     headers={"x-amzn-ErrorType": "ValidationException:"})
        if self.mode == "huge_error":
            return await self._huge_error(request)
        if self.mode in ("throttled", "unavailable"):
            kind, status = (("ThrottlingException", 429) if self.mode == "throttled"
                            else ("ServiceUnavailableException", 503))
            return web.json_response({"message": "Too many requests, please wait before "
                                      "trying again."}, status=status,
                                     headers={"x-amzn-ErrorType": f"{kind}:http://internal"})
        converse = json.loads(body)
        self.requests.append(converse)
        return converse

    async def _huge_error(self, request: web.Request) -> web.StreamResponse:
        piece = 1 << 20
        head, tail = b'{"message": "', b'"}'
        resp = web.StreamResponse(status=400, headers={
            "Content-Type": "application/json",
            "x-amzn-ErrorType": "ValidationException:http://internal"})
        resp.content_length = self.HUGE_ERROR_BYTES
        try:
            await resp.prepare(request)
            await resp.write(head)
            self.error_bytes_sent = len(head)
            left = self.HUGE_ERROR_BYTES - len(head) - len(tail)
            while left > 0:
                await resp.write(b"x" * min(piece, left))
                self.error_bytes_sent += min(piece, left)
                left -= piece
            await resp.write(tail)
            self.error_bytes_sent += len(tail)
            await resp.write_eof()
        except (ConnectionError, OSError):  # the reader stopped reading and hung up
            pass
        finally:
            self.error_body_ended.set()
        return resp

    async def _openai(self, request: web.Request) -> web.StreamResponse:
        checked = await self._checked(request)
        if isinstance(checked, web.StreamResponse):
            return checked
        assert self.inner is not None, "BedrockStandin(inner=...) serves /openai/v1"
        return await _relay(request, self.inner, "/chat/completions",
                            {**checked, "model": self.inner.models[0]})

    def _blocks(self, converse: Mapping[str, Any]) -> tuple[list[dict[str, Any]], str]:
        tools = converse.get("toolConfig", {}).get("tools", [])
        answered = any("toolResult" in block for message in converse["messages"]
                       for block in message["content"])
        if tools and not answered:
            name = tools[0]["toolSpec"]["name"]
            return [{"toolUse": {"toolUseId": "tooluse_" + secrets.token_hex(6), "name": name,
                                 "input": {"city": "Paris"}}}], "tool_use"
        return [{"text": f"Hello from {self.name}"}], "end_turn"

    async def _converse(self, request: web.Request) -> web.StreamResponse:
        checked = await self._checked(request)
        if isinstance(checked, web.StreamResponse):
            return checked
        blocks, stop = self._blocks(checked)
        return web.json_response({
            "output": {"message": {"role": "assistant", "content": blocks}},
            "stopReason": stop, "usage": {"inputTokens": 7, "outputTokens": 3,
                                          "totalTokens": 10},
            "metrics": {"latencyMs": 12}})

    async def _converse_stream(self, request: web.Request) -> web.StreamResponse:
        checked = await self._checked(request)
        if isinstance(checked, web.StreamResponse):
            return checked
        blocks, stop = self._blocks(checked)
        resp = web.StreamResponse(headers={
            "Content-Type": "application/vnd.amazon.eventstream",
            "x-amzn-RequestId": secrets.token_hex(8)})
        await resp.prepare(request)
        frames = [_event("messageStart", {"role": "assistant"})]
        for index, block in enumerate(blocks):
            if "toolUse" in block:
                tool = block["toolUse"]
                frames += [
                    _event("contentBlockStart", {"contentBlockIndex": index, "start": {
                        "toolUse": {"toolUseId": tool["toolUseId"], "name": tool["name"]}}}),
                    _event("contentBlockDelta", {"contentBlockIndex": index, "delta": {
                        "toolUse": {"input": json.dumps(tool["input"])}}})]
            else:
                for piece in block["text"].split(" "):
                    text = piece if not frames[1:] else " " + piece
                    frames.append(_event("contentBlockDelta", {
                        "contentBlockIndex": index, "delta": {"text": text}}))
            frames.append(_event("contentBlockStop", {"contentBlockIndex": index}))
        frames += [_event("messageStop", {"stopReason": stop}),
                   _event("metadata", {"usage": {"inputTokens": 7, "outputTokens": 3,
                                                 "totalTokens": 10},
                                       "metrics": {"latencyMs": 12}})]
        for number, frame in enumerate(frames):
            if self.mode == "stream_exception" and number == 1:
                await resp.write(event_frame({":exception-type": "throttlingException",
                                              ":content-type": "application/json",
                                              ":message-type": "exception"},
                                             b'{"message":"Too many requests"}'))
                break
            await resp.write(frame)
            await asyncio.sleep(0)
        await resp.write_eof()
        return resp


__all__ = [
    "AzureStandin",
    "BedrockStandin",
    "GoogleTokenEndpoint",
    "VertexStandin",
    "event_frame",
]
