"""Cloud providers as upstreams: which API an upstream speaks and how it proves who we are.

An upstream is ``provider: openai`` (any OpenAI-compatible API, the default), ``azure``
(Azure OpenAI / AI Foundry), ``vertex`` (Google Vertex AI's OpenAI-compatible endpoint)
or ``bedrock`` (AWS Bedrock's Converse API, or its OpenAI-compatible endpoint). Each
provider has its own section (``azure:``, ``vertex:``, ``bedrock:``) and its own kinds
of ``auth:``: a static ``api_key``, or the cloud's identity (``entra``, ``google``,
``aws``), so that no long-lived secret needs to be in the file.

This module declares those settings and derives what follows from them without I/O:
the public endpoint of a region (``default_url``) and the path below it that an OpenAI
path maps to (``provider_path``). Signing, tokens and the Converse translation are the
proxy's (``proxy._clouds``, ``proxy._bedrock``).
"""

from __future__ import annotations

import datetime
import enum
from collections.abc import Mapping
from types import MappingProxyType
from typing import Annotated, Final, Literal
from urllib.parse import quote

from pydantic import BeforeValidator, Field, model_validator
from pydantic.dataclasses import dataclass

from ._values import SECTION, Name, Text, invalid

#: Azure's current GA data-plane version (the ``api-version`` query parameter).
DEFAULT_AZURE_API_VERSION: Final = "2024-10-21"
#: ``api_version: v1`` selects Azure's version-less OpenAI v1 API (``/openai/v1/...``).
AZURE_V1: Final = "v1"


class Provider(enum.StrEnum):
    """The API an upstream speaks."""

    OPENAI = "openai"
    AZURE = "azure"
    VERTEX = "vertex"
    BEDROCK = "bedrock"


class BedrockApi(enum.StrEnum):
    """Which Bedrock API chat completions go to."""

    CONVERSE = "converse"  # Converse / ConverseStream, translated from and to OpenAI's shapes
    OPENAI = "openai"  # Bedrock's OpenAI-compatible chat completions endpoint


def _as_text(value: object) -> object:
    """A version YAML read as a date (2024-10-21) is the text it was written as."""
    return value.isoformat() if isinstance(value, datetime.date) else value


@dataclass(frozen=True, slots=True, kw_only=True, config=SECTION)
class AzureSettings:
    """Azure OpenAI / AI Foundry: the API version and a deployment per model alias."""

    api_version: Annotated[Text, BeforeValidator(_as_text)] = Field(
        default=DEFAULT_AZURE_API_VERSION,
        description="The api-version of the deployment API; 'v1' uses Azure's OpenAI v1 path "
                    "(/openai/v1/..., the deployment goes in the body's model).")
    deployments: Mapping[str, str] = Field(
        default_factory=lambda: MappingProxyType({}),
        description="Model alias -> Azure deployment name (like models: for other providers).")

    @model_validator(mode="after")
    def _frozen(self) -> AzureSettings:
        if not self.api_version.strip():
            raise invalid("api_version is empty; write a version like 2024-10-21, or v1")
        object.__setattr__(self, "deployments", MappingProxyType(dict(self.deployments)))
        return self


@dataclass(frozen=True, slots=True, kw_only=True, config=SECTION)
class VertexSettings:
    """Google Vertex AI: the project and location of its OpenAI-compatible endpoint."""

    project: Name = Field(description="The Google Cloud project id.")
    location: Name = Field(
        default="us-central1",
        description="The region (us-central1, europe-west4, ...) or 'global'.")


@dataclass(frozen=True, slots=True, kw_only=True, config=SECTION)
class BedrockSettings:
    """AWS Bedrock: the region requests are signed for, and which API serves chat."""

    region: Name = Field(description="The AWS region, e.g. us-west-2 (used in signing).")
    api: BedrockApi = Field(
        default=BedrockApi.CONVERSE,
        description="converse: Bedrock's Converse API, translated to and from OpenAI's "
                    "chat completions; openai: Bedrock's OpenAI-compatible endpoint.")


@dataclass(frozen=True, slots=True, kw_only=True, config=SECTION)
class UpstreamAuth:
    """How skyroute proves who it is to the upstream: one of these keys."""

    api_key: Text | None = Field(
        default=None, repr=False,
        description="A static key, written as ${ENV_NAME}: a Bearer token, or Azure's api-key "
                    "header.")
    entra: Literal["default"] | None = Field(
        default=None,
        description="Azure: Entra ID tokens from azure-identity's DefaultAzureCredential "
                    "(workload identity, managed identity, environment, CLI).")
    google: Literal["default"] | None = Field(
        default=None,
        description="Vertex: OAuth tokens from google-auth's Application Default Credentials "
                    "(GKE workload identity, a service-account file, metadata server).")
    aws: Literal["default"] | None = Field(
        default=None,
        description="Bedrock: SigV4 with botocore's credential chain (environment, profile, "
                    "IRSA web identity, instance role).")

    @model_validator(mode="after")
    def _one_kind(self) -> UpstreamAuth:
        given = self.kinds
        if len(given) > 1:
            raise invalid(f"auth gives {' and '.join(given)}; give exactly one")
        if not given:
            raise invalid("auth is empty; give one of api_key, entra, google, aws")
        return self

    @property
    def kinds(self) -> list[str]:
        """The kinds of credential given (exactly one once validated)."""
        return [name for name in ("api_key", "entra", "google", "aws")
                if getattr(self, name) is not None]


#: Which kinds of auth each provider takes.
_AUTH_KINDS: Final = {
    Provider.OPENAI: ("api_key",),
    Provider.AZURE: ("api_key", "entra"),
    Provider.VERTEX: ("google",),
    Provider.BEDROCK: ("aws",),
}
#: The section each provider reads, by its YAML key.
_SECTIONS: Final = {Provider.AZURE: "azure", Provider.VERTEX: "vertex",
                    Provider.BEDROCK: "bedrock"}


def provider_problem(provider: Provider, *, url: str | None, auth: UpstreamAuth | None,
                     sections: Mapping[str, object | None]) -> str | None:
    """What is wrong with an upstream's provider settings, or ``None``.

    Args:
        sections: the upstream's ``azure``, ``vertex`` and ``bedrock`` values (``None``
            where not given).
    """
    wanted = _SECTIONS.get(provider)
    for key, value in sections.items():
        if value is not None and key != wanted:
            return (f"'{key}:' is for provider: {key}, and this upstream is provider: "
                    f"{provider.value}; remove it or set provider: {key}")
    if wanted is not None and provider is not Provider.AZURE and sections.get(wanted) is None:
        return f"provider: {provider.value} needs a '{wanted}:' section ({_HINT[provider]})"
    if provider is Provider.AZURE and url is None:
        return ("provider: azure needs 'url:', the resource endpoint, e.g. "
                "https://my-resource.openai.azure.com")
    if auth is not None:
        kind = auth.kinds[0]
        if kind not in _AUTH_KINDS[provider]:
            allowed = " or ".join(_AUTH_KINDS[provider])
            return f"auth: {kind} is not for provider: {provider.value}; use {allowed}"
    elif provider in (Provider.VERTEX, Provider.BEDROCK):
        return (f"provider: {provider.value} needs auth: (e.g. "
                f"{{{_AUTH_KINDS[provider][0]}: default}})")
    return None


_HINT: Final = {
    Provider.VERTEX: "e.g. vertex: {project: my-proj, location: us-central1}",
    Provider.BEDROCK: "e.g. bedrock: {region: us-west-2}",
}


def default_url(provider: Provider, *, vertex: VertexSettings | None,
                bedrock: BedrockSettings | None) -> str | None:
    """The public endpoint (scheme and host) of a provider's region; ``None`` if it has none."""
    if provider is Provider.VERTEX and vertex is not None:
        if vertex.location == "global":
            return "https://aiplatform.googleapis.com"
        return f"https://{vertex.location}-aiplatform.googleapis.com"
    if provider is Provider.BEDROCK and bedrock is not None:
        return f"https://bedrock-runtime.{bedrock.region}.amazonaws.com"
    return None


def provider_path(provider: Provider, path_qs: str, *, model: str, stream: bool,
                  azure: AzureSettings | None = None, vertex: VertexSettings | None = None,
                  bedrock: BedrockSettings | None = None) -> str | None:
    """The path (and query) below the upstream's URL that OpenAI's ``path_qs`` goes to.

    ``path_qs`` is relative to an OpenAI base URL (``/chat/completions?...``). ``model``
    is the upstream's own name for the requested alias (an Azure deployment, a Bedrock
    model id). ``None``: this provider has no such path (Bedrock's Converse API serves
    chat completions only).
    """
    if provider is Provider.AZURE and azure is not None:
        path, _, query = path_qs.partition("?")
        if azure.api_version == AZURE_V1:
            return f"/openai/v1{path_qs}"
        version = f"api-version={quote(azure.api_version, safe='')}"
        query = f"{query}&{version}" if query else version
        return f"/openai/deployments/{quote(model, safe='')}{path}?{query}"
    if provider is Provider.VERTEX and vertex is not None:
        return (f"/v1/projects/{quote(vertex.project, safe='')}/locations/"
                f"{quote(vertex.location, safe='')}/endpoints/openapi{path_qs}")
    if provider is Provider.BEDROCK and bedrock is not None:
        if bedrock.api is BedrockApi.OPENAI:
            return f"/openai/v1{path_qs}"
        if path_qs.partition("?")[0] != "/chat/completions":
            return None
        action = "converse-stream" if stream else "converse"
        return f"/model/{quote(model, safe='')}/{action}"
    return path_qs


__all__ = [
    "AZURE_V1",
    "DEFAULT_AZURE_API_VERSION",
    "AzureSettings",
    "BedrockApi",
    "BedrockSettings",
    "Provider",
    "UpstreamAuth",
    "VertexSettings",
    "default_url",
    "provider_path",
    "provider_problem",
]
