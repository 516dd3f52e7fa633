"""Azure OpenAI, Vertex AI and Bedrock as upstreams, through the openai SDK.

The stand-ins (``skyroute.proxy.demo._clouds``) check what each cloud checks: Azure's
deployment path, ``api-version`` and key header; a current OAuth token from a local
Google token endpoint (google-auth signs its JWT with a test RSA key); a SigV4
signature Bedrock's stand-in recomputes with botocore from the same test credentials.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import openai
import pytest
from skyroute.proxy.demo._clouds import (
    AzureStandin,
    BedrockStandin,
    GoogleTokenEndpoint,
    VertexStandin,
)

from .conftest import CALL_TIMEOUT_S, client_for, eventually, routing_yaml
from .conftest import upstream_yaml as entry

MESSAGES = [{"role": "user", "content": "hi"}]
AZURE_KEY = "azure-test-key-123456"
AWS_KEY, AWS_SECRET = "AKIDTESTTESTTEST", "test-secret-key-abcdefghijklmnop"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]


@pytest.fixture
async def started():
    """Factory: start a cloud stand-in (stopped at the end of the test)."""
    servers = []

    async def start(server):
        await server.start()
        servers.append(server)
        return server

    yield start
    for server in reversed(servers):
        await server.aclose()


def azure_yaml(name: str, url: str, *, key: str = AZURE_KEY, api_version: str = "2024-10-21"
               ) -> str:
    return (f"  - name: {name}\n    provider: azure\n    url: {url}\n"
            f"    azure: {{api_version: {api_version}, deployments: {{chat: my-r1}}}}\n"
            f"    auth: {{api_key: {key}}}\n")


def failover_yaml(first: str, first_name: str, second: str, second_name: str) -> str:
    """A routing file whose route 'chat' tries ``first_name``, then ``second_name``."""
    return routing_yaml([first, second], "- model: chat\n  strategy: priority\n"
                                         f"  targets: [{first_name}, {second_name}]\n")


async def test_azure_deployment_path_api_version_and_key(standin, skyroute, started):
    inner = await standin("azure-inner")
    azure = await started(AzureStandin(inner, api_key=AZURE_KEY,
                                       deployments={"my-r1": "deepseek-chat"}))
    server = await skyroute(routing_yaml([azure_yaml("azure-eastus", azure.url)]))
    async with client_for(server) as client:
        reply = await client.chat.completions.create(model="chat", messages=MESSAGES)
        chunks = [c async for c in await client.chat.completions.create(
            model="chat", messages=MESSAGES, stream=True)]
    assert reply.choices[0].message.content.startswith("Hello from azure-inner")
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) \
        .startswith("Hello from azure-inner")
    assert azure.requests == ["/openai/deployments/my-r1/chat/completions"
                              "?api-version=2024-10-21"] * 2
    # skyroute's api-key header reaches Azure, and the client's key does not.
    assert azure.last_headers["api-key"] == AZURE_KEY
    assert "Authorization" not in azure.last_headers


async def test_azure_v1_path_puts_the_deployment_in_the_body(standin, skyroute, started):
    inner = await standin("azure-inner")
    azure = await started(AzureStandin(inner, api_key=AZURE_KEY,
                                       deployments={"my-r1": "deepseek-chat"}))
    server = await skyroute(routing_yaml([azure_yaml("azure-v1", azure.url, api_version="v1")]))
    async with client_for(server) as client:
        reply = await client.chat.completions.create(model="chat", messages=MESSAGES)
    assert reply.choices[0].message.content.startswith("Hello from azure-inner")
    assert azure.requests == ["/openai/v1/chat/completions"]


async def test_azure_429_with_retry_after_ms_fails_over(standin, skyroute, started):
    """Azure's throttle (429, retry-after-ms) is rate_limited: the next upstream answers."""
    inner = await standin("azure-inner")
    inner.behaviour.mode = "rate_limited"
    azure = await started(AzureStandin(inner, api_key=AZURE_KEY,
                                       deployments={"my-r1": "deepseek-chat"}))
    backup = await standin("backup")
    server = await skyroute(failover_yaml(
        azure_yaml("azure-eastus", azure.url), "azure-eastus",
        entry(backup), "backup"))
    async with client_for(server) as client:
        reply = await client.chat.completions.create(model="chat", messages=MESSAGES)
    assert reply.choices[0].message.content.startswith("Hello from backup")
    assert len(azure.requests) == 1


async def test_azure_wrong_key_is_a_bad_key_and_fails_over(standin, skyroute, started,
                                                           captured_logs):
    inner = await standin("azure-inner")
    azure = await started(AzureStandin(inner, api_key=AZURE_KEY,
                                       deployments={"my-r1": "deepseek-chat"}))
    backup = await standin("backup")
    server = await skyroute(failover_yaml(
        azure_yaml("azure-eastus", azure.url, key="wrong-key-123456"), "azure-eastus",
        entry(backup), "backup"))
    async with client_for(server) as client:
        reply = await client.chat.completions.create(model="chat", messages=MESSAGES)
    assert reply.choices[0].message.content.startswith("Hello from backup")
    assert not azure.requests
    assert "wrong-key-123456" not in json.dumps(captured_logs, default=str)


async def test_azure_content_filter_refusal_passes_through_as_sent(standin, skyroute, started):
    """The client gets Azure's own 400 content_filter answer, as it would directly."""
    inner = await standin("azure-inner")
    azure = await started(AzureStandin(inner, api_key=AZURE_KEY,
                                       deployments={"my-r1": "deepseek-chat"}))
    server = await skyroute(routing_yaml([azure_yaml("azure-eastus", azure.url)]))
    blocked = [{"role": "user", "content": "something forbidden"}]
    async with client_for(server) as client:
        with pytest.raises(openai.BadRequestError) as through:
            await client.chat.completions.create(model="chat", messages=blocked)
    async with openai.AsyncAzureOpenAI(azure_endpoint=azure.url, api_key=AZURE_KEY,
                                       api_version="2024-10-21", max_retries=0,
                                       timeout=10) as direct:
        with pytest.raises(openai.BadRequestError) as directly:
            await direct.chat.completions.create(model="my-r1", messages=blocked)
    assert through.value.code == directly.value.code == "content_filter"
    assert through.value.body == directly.value.body
    assert len(azure.requests) == 2


@pytest.fixture
async def google_credentials(tmp_path, monkeypatch, started):
    """A local Google token endpoint and a service-account file google-auth finds (ADC)."""
    tokens = await started(GoogleTokenEndpoint(lifetime_s=4.0))
    path = tmp_path / "service-account.json"
    path.write_text(json.dumps(tokens.service_account_info()))
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(path))
    return tokens


def vertex_yaml(name: str, url: str) -> str:
    return (f"  - name: {name}\n    provider: vertex\n    url: {url}\n"
            "    vertex: {project: test-project, location: us-central1}\n"
            "    auth: {google: default}\n    models: {chat: deepseek-chat}\n")


async def test_vertex_uses_current_google_tokens_refreshed_in_the_background(
        standin, skyroute, started, google_credentials):
    """Tokens live 4 s; over ~9 s of traffic every request carries a current one, the
    refresh happens ahead of expiry in the background, and never twice at once."""
    inner = await standin("vertex-inner")
    vertex = await started(VertexStandin(inner, google_credentials, project="test-project",
                                         location="us-central1"))
    server = await skyroute(routing_yaml([vertex_yaml("vertex-us-central1", vertex.url)]))
    tokens = google_credentials
    async with client_for(server) as client:
        reply = await client.chat.completions.create(model="chat", messages=MESSAGES)
        assert reply.choices[0].message.content.startswith("Hello from vertex-inner")
        for _ in range(2):  # two more tokens, fetched with no request asking for them
            fetched = tokens.requests
            await eventually(lambda fetched=fetched: tokens.requests > fetched, timeout=15)
            chunks = [c async for c in await client.chat.completions.create(
                model="chat", messages=MESSAGES, stream=True)]
            assert "".join(c.choices[0].delta.content or "" for c in chunks
                           if c.choices).startswith("Hello from vertex-inner")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http, \
            http.get(f"{server.url}/metrics") as resp:
        metrics = await resp.text()
    assert vertex.refused == 0  # every request carried a current token
    assert tokens.max_in_flight == 1  # never two refreshes at once
    assert ('skyroute_cloud_credential_fetches_total{provider="vertex",result="ok",'
            'upstream="vertex-us-central1"}') in metrics
    assert vertex.requests[0] == ("/v1/projects/test-project/locations/us-central1/"
                                  "endpoints/openapi/chat/completions")


async def test_vertex_without_credentials_is_a_bad_key_with_a_hint(
        standin, skyroute, started, tmp_path, monkeypatch, captured_logs):
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", str(tmp_path / "missing.json"))
    inner = await standin("vertex-inner")
    backup = await standin("backup")
    tokens = await started(GoogleTokenEndpoint())
    vertex = await started(VertexStandin(inner, tokens, project="test-project",
                                         location="us-central1"))
    server = await skyroute(failover_yaml(
        vertex_yaml("vertex-us-central1", vertex.url), "vertex-us-central1",
        entry(backup), "backup"))
    async with client_for(server) as client:
        reply = await client.chat.completions.create(model="chat", messages=MESSAGES)
    assert reply.choices[0].message.content.startswith("Hello from backup")
    failed = [e for e in captured_logs if e.get("event") == "credential_failed"]
    assert failed and failed[0]["provider"] == "vertex"
    assert "GOOGLE_APPLICATION_CREDENTIALS" in failed[0]["hint"]


async def test_vertex_resource_exhausted_fails_over(standin, skyroute, started,
                                                   google_credentials):
    inner = await standin("vertex-inner")
    vertex = await started(VertexStandin(inner, google_credentials, project="test-project",
                                         location="us-central1"))
    vertex.exhausted = True
    backup = await standin("backup")
    server = await skyroute(failover_yaml(
        vertex_yaml("vertex-us-central1", vertex.url), "vertex-us-central1",
        entry(backup), "backup"))
    async with client_for(server) as client:
        reply = await client.chat.completions.create(model="chat", messages=MESSAGES)
    assert reply.choices[0].message.content.startswith("Hello from backup")
    assert len(vertex.requests) == 1
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http, \
            http.get(f"{server.url}/health") as resp:
        vertex_health = (await resp.json())["upstreams"]["vertex-us-central1"]
    assert vertex_health["state"] == "open"  # a 429 without Retry-After cools it off
    assert vertex_health["provider"] == "vertex"
    assert vertex_health["credential"] == {"auth": "google", "valid": True}


@pytest.fixture
def aws_credentials(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", AWS_KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS_SECRET)
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    monkeypatch.setenv("AWS_CONFIG_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def bedrock_yaml(name: str, url: str) -> str:
    return (f"  - name: {name}\n    provider: bedrock\n    url: {url}\n"
            "    bedrock: {region: us-west-2}\n    auth: {aws: default}\n"
            "    models: {chat: us.deepseek.r1-v1:0}\n")


async def bedrock(started, name: str = "bedrock-us-west-2", *, secret: str = AWS_SECRET):
    return await started(BedrockStandin(name, access_key=AWS_KEY, secret_key=secret,
                                        region="us-west-2", models=("us.deepseek.r1-v1:0",)))


async def test_bedrock_converse_chat_stream_usage_and_tools(skyroute, started, aws_credentials):
    cloud = await bedrock(started)
    server = await skyroute(routing_yaml([bedrock_yaml("bedrock-us-west-2", cloud.url)]))
    async with client_for(server) as client:
        reply = await client.chat.completions.create(
            model="chat", messages=[{"role": "system", "content": "Be brief."}, *MESSAGES],
            max_tokens=50, temperature=0.2, stop=["END"])
        chunks = [c async for c in await client.chat.completions.create(
            model="chat", messages=MESSAGES, stream=True,
            stream_options={"include_usage": True})]
        called = await client.chat.completions.create(model="chat", messages=MESSAGES,
                                                      tools=TOOLS)
        streamed_call = [c async for c in await client.chat.completions.create(
            model="chat", messages=MESSAGES, tools=TOOLS, stream=True)]
    assert reply.choices[0].message.content == "Hello from bedrock-us-west-2"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens == 7 and reply.usage.completion_tokens == 3
    sent = cloud.requests[0]
    assert sent["system"] == [{"text": "Be brief."}]
    assert sent["inferenceConfig"] == {"maxTokens": 50, "temperature": 0.2,
                                       "stopSequences": ["END"]}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from bedrock-us-west-2"
    assert chunks[-1].usage.total_tokens == 10 and not chunks[-1].choices
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    call = called.choices[0].message.tool_calls[0]
    assert called.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    deltas = [c.choices[0].delta.tool_calls[0] for c in streamed_call
              if c.choices and c.choices[0].delta.tool_calls]
    assert deltas[0].function.name == "get_weather"
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == {"city": "Paris"}
    assert cloud.requests[2]["toolConfig"]["tools"][0]["toolSpec"]["name"] == "get_weather"
    assert not cloud.refused


async def test_bedrock_tool_results_go_back_as_tool_result_blocks(skyroute, started,
                                                                 aws_credentials):
    cloud = await bedrock(started)
    server = await skyroute(routing_yaml([bedrock_yaml("bedrock-us-west-2", cloud.url)]))
    history = [*MESSAGES,
               {"role": "assistant", "content": None, "tool_calls": [{
                   "id": "tooluse_1", "type": "function",
                   "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "tooluse_1", "content": "sunny"}]
    async with client_for(server) as client:
        reply = await client.chat.completions.create(model="chat", messages=history,
                                                     tools=TOOLS)
    assert reply.choices[0].message.content == "Hello from bedrock-us-west-2"
    turns = cloud.requests[0]["messages"]
    assert [t["role"] for t in turns] == ["user", "assistant", "user"]
    assert turns[1]["content"] == [{"toolUse": {"toolUseId": "tooluse_1", "name": "get_weather",
                                                "input": {"city": "Paris"}}}]
    assert turns[2]["content"] == [{"toolResult": {"toolUseId": "tooluse_1",
                                                   "content": [{"text": "sunny"}]}}]


async def test_bedrock_wrong_secret_is_refused_and_a_bad_key(skyroute, started, standin,
                                                            aws_credentials, captured_logs):
    cloud = await bedrock(started, secret="another-secret-entirely-000000")
    backup = await standin("backup")
    server = await skyroute(failover_yaml(
        bedrock_yaml("bedrock-us-west-2", cloud.url), "bedrock-us-west-2",
        entry(backup), "backup"))
    async with client_for(server) as client:
        reply = await client.chat.completions.create(model="chat", messages=MESSAGES)
    assert reply.choices[0].message.content.startswith("Hello from backup")
    assert cloud.refused and "does not match" in cloud.refused[0]
    (change,) = [e for e in captured_logs if e.get("event") == "upstream_state_changed"]
    assert change["to"] == "bad_key"
    assert "provider bedrock refused the aws credential (InvalidSignatureException)" \
        in change["reason"]
    assert "bedrock:InvokeModel" in change["reason"]
    assert AWS_SECRET not in json.dumps(captured_logs, default=str)


@pytest.mark.parametrize("mode", ["throttled", "unavailable", "stream_exception"])
async def test_overloaded_bedrock_fails_over_to_another_cloud(standin, skyroute, started,
                                                             aws_credentials, mode):
    """ThrottlingException, ServiceUnavailableException, or a stream cut by an exception
    frame before content: each fails over to Azure; the client sees whole answers."""
    cloud = await bedrock(started)
    cloud.mode = mode
    inner = await standin("azure-inner")
    azure = await started(AzureStandin(inner, api_key=AZURE_KEY,
                                       deployments={"my-r1": "deepseek-chat"}))
    server = await skyroute(failover_yaml(
        bedrock_yaml("bedrock-us-west-2", cloud.url), "bedrock-us-west-2",
        azure_yaml("azure-eastus", azure.url), "azure-eastus"))
    async with client_for(server) as client:
        chunks = [c async for c in await client.chat.completions.create(
            model="chat", messages=MESSAGES, stream=True)]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith("Hello from azure-inner")
    assert len(azure.requests) == 1


async def test_bedrock_openai_compatible_endpoint_is_signed_too(standin, skyroute, started,
                                                                aws_credentials):
    inner = await standin("bedrock-openai")
    cloud = await started(BedrockStandin("bedrock", access_key=AWS_KEY, secret_key=AWS_SECRET,
                                         region="us-west-2", models=("openai.gpt-oss-120b-1:0",),
                                         inner=inner))
    server = await skyroute(routing_yaml([
        "  - name: bedrock-openai\n    provider: bedrock\n"
        f"    url: {cloud.url}\n    bedrock: {{region: us-west-2, api: openai}}\n"
        "    auth: {aws: default}\n    models: {chat: openai.gpt-oss-120b-1:0}\n"]))
    async with client_for(server) as client:
        reply = await client.chat.completions.create(model="chat", messages=MESSAGES)
        chunks = [c async for c in await client.chat.completions.create(
            model="chat", messages=MESSAGES, stream=True)]
    assert reply.choices[0].message.content.startswith("Hello from bedrock-openai")
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) \
        .startswith("Hello from bedrock-openai")
    assert not cloud.refused and cloud.requests[0]["model"] == "openai.gpt-oss-120b-1:0"


async def test_unsupported_path_on_converse_is_a_clear_400(skyroute, started, aws_credentials):
    cloud = await bedrock(started)
    server = await skyroute(routing_yaml([bedrock_yaml("bedrock-us-west-2", cloud.url)]))
    async with client_for(server) as client:
        with pytest.raises(openai.BadRequestError, match="Converse"):
            await client.embeddings.create(model="chat", input="hi")
        with pytest.raises(openai.BadRequestError, match="n: Bedrock"):
            await client.chat.completions.create(model="chat", messages=MESSAGES, n=2)
    assert not cloud.requests



async def test_a_credential_wait_cancelled_as_the_credential_arrives_ends_cancelled():
    """A request waiting for a first credential, cancelled (its client went away) in the very
    tick the credential arrives, ends cancelled: on Python 3.11 asyncio.wait_for swallowed
    such a cancellation and the request went on."""
    from skyroute.proxy._clouds import RefreshedCredential

    loop = asyncio.get_running_loop()
    waiter: asyncio.Task[str] | None = None

    def cancel_the_waiter(ok: bool) -> None:  # runs just before the credential is announced
        assert waiter is not None
        loop.call_soon(waiter.cancel)

    credential = RefreshedCredential("a", "azure", "entra", lambda: ("token", time.time() + 3600),
                                     on_fetch=cancel_the_waiter)
    waiter = asyncio.create_task(credential.get())
    try:
        await asyncio.wait({waiter}, timeout=CALL_TIMEOUT_S)
        assert waiter.cancelled()
    finally:
        await credential.aclose()


async def test_a_huge_bedrock_error_body_is_read_no_further_than_the_limit(skyroute, started,
                                                                          aws_credentials):
    """A Bedrock 400 whose body is 64 MiB is read only up to skyroute's error-body limit:
    the stand-in cannot send it all, and the client gets the error's type as its message."""
    cloud = await bedrock(started)
    cloud.mode = "huge_error"
    server = await skyroute(routing_yaml([bedrock_yaml("bedrock-us-west-2", cloud.url)]))
    async with client_for(server) as client:
        with pytest.raises(openai.BadRequestError) as raised:
            await client.chat.completions.create(model="chat", messages=MESSAGES)
    assert raised.value.body["message"] == "ValidationException"
    async with asyncio.timeout(CALL_TIMEOUT_S):
        await cloud.error_body_ended.wait()
    assert cloud.error_bytes_sent < cloud.HUGE_ERROR_BYTES
