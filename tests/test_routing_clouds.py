"""Cloud upstream settings: validation with file:line, public endpoints, provider paths."""

from __future__ import annotations

import pytest
from skyroute.routing import (
    BedrockApi,
    ConfigError,
    Provider,
    Result,
    classify_provider_error,
    parse_config,
    provider_path,
)
from skyroute.routing.config import AzureSettings, BedrockSettings, VertexSettings

HEAD = "upstreams:\n"
ROUTE = "routes:\n  - model: chat\n    targets: [u]\n"


def config(entry: str):
    return parse_config(HEAD + entry + ROUTE, env={"KEY": "secret-value"}, source="routing.yaml")


def problems(entry: str) -> str:
    with pytest.raises(ConfigError) as caught:
        config(entry)
    return str(caught.value)


def test_the_issue_example_validates_with_public_endpoints():
    upstreams = parse_config("""
upstreams:
  - name: azure-eastus
    provider: azure
    url: https://my-resource.openai.azure.com
    azure: {api_version: 2024-10-21, deployments: {chat: deepseek-r1}}
    auth: {api_key: "${AZURE_KEY}"}
  - name: vertex-us-central1
    provider: vertex
    vertex: {project: my-proj, location: us-central1}
    auth: {google: default}
    models: {chat: deepseek-ai/deepseek-r1-0528-maas}
  - name: bedrock-us-west-2
    provider: bedrock
    bedrock: {region: us-west-2}
    auth: {aws: default}
    models: {chat: us.deepseek.r1-v1:0}
routes:
  - model: chat
    targets: [azure-eastus, vertex-us-central1, bedrock-us-west-2]
""", env={"AZURE_KEY": "azure-secret"}, source="routing.yaml").upstreams
    azure, vertex, bedrock = upstreams
    assert azure.azure.api_version == "2024-10-21"  # YAML reads it as a date; it stays text
    assert azure.model_for("chat") == "deepseek-r1"
    assert azure.api_key == "azure-secret"
    assert vertex.url == "https://us-central1-aiplatform.googleapis.com"
    assert bedrock.url == "https://bedrock-runtime.us-west-2.amazonaws.com"
    assert bedrock.bedrock.api is BedrockApi.CONVERSE


@pytest.mark.parametrize(("entry", "message"), [
    ("  - name: u\n    provider: azure\n    auth: {api_key: k}\n",
     "routing.yaml:2: upstreams[0]: provider: azure needs 'url:'"),
    ("  - name: u\n    provider: vertex\n    auth: {google: default}\n",
     "routing.yaml:2: upstreams[0]: provider: vertex needs a 'vertex:' section"),
    ("  - name: u\n    provider: bedrock\n    bedrock: {region: us-west-2}\n",
     "provider: bedrock needs auth: (e.g. {aws: default})"),
    ("  - name: u\n    provider: bedrock\n    bedrock: {region: us-west-2}\n"
     "    auth: {google: default}\n",
     "auth: google is not for provider: bedrock; use aws"),
    ("  - name: u\n    url: http://127.0.0.1:1/v1\n    vertex: {project: p}\n",
     "'vertex:' is for provider: vertex, and this upstream is provider: openai"),
    ("  - name: u\n    provider: azure\n    url: https://x.openai.azure.com\n"
     "    auth: {api_key: a, entra: default}\n",
     "auth gives api_key and entra; give exactly one"),
    ("  - name: u\n    provider: azure\n    url: https://x.openai.azure.com\n"
     "    api_key: a\n    auth: {api_key: b}\n", "give the key once"),
    ("  - name: u\n    provider: gcp\n    url: https://x\n", "provider"),
    ("  - name: u\n    provider: vertex\n    vertex: {project: p}\n    auth: {google: adc}\n",
     "upstreams[0].auth.google"),
])
def test_wrong_provider_settings_are_reported_where_they_are(entry, message):
    assert message in problems(entry)


def test_provider_paths():
    azure = AzureSettings(api_version="2024-10-21")
    assert provider_path(Provider.AZURE, "/chat/completions", model="my r1", stream=False,
                         azure=azure) == \
        "/openai/deployments/my%20r1/chat/completions?api-version=2024-10-21"
    assert provider_path(Provider.AZURE, "/chat/completions?x=1", model="d", stream=False,
                         azure=azure).endswith("?x=1&api-version=2024-10-21")
    assert provider_path(Provider.AZURE, "/chat/completions", model="d", stream=False,
                         azure=AzureSettings(api_version="v1")) == "/openai/v1/chat/completions"
    assert provider_path(Provider.VERTEX, "/chat/completions", model="m", stream=True,
                         vertex=VertexSettings(project="p", location="europe-west4")) == \
        "/v1/projects/p/locations/europe-west4/endpoints/openapi/chat/completions"
    bedrock = BedrockSettings(region="us-west-2")
    assert provider_path(Provider.BEDROCK, "/chat/completions", model="us.deepseek.r1-v1:0",
                         stream=True, bedrock=bedrock) == \
        "/model/us.deepseek.r1-v1%3A0/converse-stream"
    assert provider_path(Provider.BEDROCK, "/embeddings", model="m", stream=False,
                         bedrock=bedrock) is None
    assert provider_path(Provider.BEDROCK, "/chat/completions", model="m", stream=False,
                         bedrock=BedrockSettings(region="r", api=BedrockApi.OPENAI)) == \
        "/openai/v1/chat/completions"


@pytest.mark.parametrize(("status", "error_type", "result"), [
    (429, "ThrottlingException:http://internal", Result.RATE_LIMITED),
    (503, "ServiceUnavailableException", Result.SERVER_ERROR),
    (429, "ModelNotReadyException", Result.SERVER_ERROR),
    (408, "ModelTimeoutException", Result.TIMEOUT),
    (403, "ExpiredTokenException", Result.BAD_KEY),
    (400, "ValidationException", Result.CLIENT_ERROR),
    (429, "", Result.RATE_LIMITED),  # Azure's and Vertex's throttles are plain 429s
])
def test_cloud_errors_are_classified_for_routing(status, error_type, result):
    assert classify_provider_error(status, error_type) is result
