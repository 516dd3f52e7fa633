"""skyroute is a drop-in: the same SDK calls give the same results directly and through it.

One table of calls (chat, streams, tools, Responses, embeddings, files, batches, audio,
images, models, moderation, upstream errors), each made with the official openai SDK once
straight at a stand-in upstream and once through skyroute in front of it. The parsed
results (ids and timestamps normalised) and the exception classes must be equal. The
table runs twice: with plain answers, and with an upstream that gzips its answers even
when asked for identity (as aiohttp's default Accept-Encoding used to invite).
"""

from __future__ import annotations

import io
import re
from collections.abc import Awaitable, Callable
from typing import Any

import openai
import pytest
from skyroute.proxy.demo import StandinUpstream

from .conftest import CALL_TIMEOUT_S, UPSTREAM_KEY, client_for, routing_yaml

MODELS = ("deepseek-chat", "text-embedding-3-small", "whisper-1", "tts-1", "gpt-image-1",
          "omni-moderation-latest")
MESSAGES = [{"role": "user", "content": "hi"}]
TOOLS = [{"type": "function", "function": {
    "name": "lookup", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}}}}]
_RANDOM_ID = re.compile(r"^(chatcmpl-|cmpl-|resp_|msg_|file-|batch_|modr-)[0-9a-f]+$")
_TIMES = frozenset({"created", "created_at"})

Call = Callable[[openai.AsyncOpenAI, StandinUpstream], Awaitable[Any]]


def normalised(value: Any) -> Any:
    """``value`` with the parts that differ on every call (ids, times) replaced."""
    if isinstance(value, dict):
        return {k: 0 if k in _TIMES else normalised(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [normalised(v) for v in value]
    if isinstance(value, str) and _RANDOM_ID.match(value):
        return _RANDOM_ID.match(value).group(1) + "<id>"  # type: ignore[union-attr]
    return value


async def chat(c: openai.AsyncOpenAI, up: StandinUpstream) -> Any:
    return await c.chat.completions.create(model="deepseek-chat", messages=MESSAGES)


async def chat_stream(c: openai.AsyncOpenAI, up: StandinUpstream) -> Any:
    stream = await c.chat.completions.create(model="deepseek-chat", messages=MESSAGES,
                                             stream=True,
                                             stream_options={"include_usage": True})
    return [chunk.model_dump() async for chunk in stream]


async def chat_tools(c: openai.AsyncOpenAI, up: StandinUpstream) -> Any:
    return await c.chat.completions.create(model="deepseek-chat", messages=MESSAGES,
                                           tools=TOOLS)  # type: ignore[arg-type]


async def completion(c: openai.AsyncOpenAI, up: StandinUpstream) -> Any:
    return await c.completions.create(model="deepseek-chat", prompt="Say hi")


async def embeddings(c: openai.AsyncOpenAI, up: StandinUpstream) -> Any:
    return await c.embeddings.create(model="text-embedding-3-small", input=["a", "b"])


async def responses_plain(c: openai.AsyncOpenAI, up: StandinUpstream) -> Any:
    response = await c.responses.create(model="deepseek-chat", input="hi")
    return response.output_text, response.model_dump()


async def responses_stream(c: openai.AsyncOpenAI, up: StandinUpstream) -> Any:
    stream = await c.responses.create(model="deepseek-chat", input="hi", stream=True)
    return [event.model_dump() async for event in stream]


async def responses_previous(c: openai.AsyncOpenAI, up: StandinUpstream) -> Any:
    first = await c.responses.create(model="deepseek-chat", input="hi")
    second = await c.responses.create(model="deepseek-chat", input="again",
                                      previous_response_id=first.id)
    assert second.previous_response_id == first.id
    return second.model_dump()


async def responses_retrieve(c: openai.AsyncOpenAI, up: StandinUpstream) -> Any:
    first = await c.responses.create(model="deepseek-chat", input="hi")
    return (await c.responses.retrieve(first.id)).model_dump()


async def _upload(c: openai.AsyncOpenAI, data: bytes = b'{"custom_id": "1"}\n') -> Any:
    return await c.files.create(file=("batch.jsonl", io.BytesIO(data)), purpose="batch")


async def files_create(c: openai.AsyncOpenAI, up: StandinUpstream) -> Any:
    return await _upload(c)


async def files_retrieve(c: openai.AsyncOpenAI, up: StandinUpstream) -> Any:
    return await c.files.retrieve((await _upload(c)).id)


async def files_content(c: openai.AsyncOpenAI, up: StandinUpstream) -> Any:
    data = bytes(range(256)) * 64  # binary, not UTF-8
    content = await c.files.content((await _upload(c, data)).id)
    assert content.content == data
    return content.content, content.response.headers["content-type"]


async def files_delete(c: openai.AsyncOpenAI, up: StandinUpstream) -> Any:
    return await c.files.delete((await _upload(c)).id)


async def batches_create(c: openai.AsyncOpenAI, up: StandinUpstream) -> Any:
    return await c.batches.create(input_file_id=(await _upload(c)).id,
                                  endpoint="/v1/chat/completions", completion_window="24h")


async def batches_retrieve(c: openai.AsyncOpenAI, up: StandinUpstream) -> Any:
    batch = await batches_create(c, up)
    return await c.batches.retrieve(batch.id)


async def transcription(c: openai.AsyncOpenAI, up: StandinUpstream) -> Any:
    return await c.audio.transcriptions.create(model="whisper-1",
                                               file=("a.mp3", io.BytesIO(b"\xff\xfb" * 500)))


async def transcription_text(c: openai.AsyncOpenAI, up: StandinUpstream) -> Any:
    return await c.audio.transcriptions.create(model="whisper-1", response_format="text",
                                               file=("a.mp3", io.BytesIO(b"\xff\xfb" * 500)))


async def speech(c: openai.AsyncOpenAI, up: StandinUpstream) -> Any:
    audio = await c.audio.speech.create(model="tts-1", voice="alloy", input="hello")
    return audio.content, audio.response.headers["content-type"]


async def image(c: openai.AsyncOpenAI, up: StandinUpstream) -> Any:
    return await c.images.generate(model="gpt-image-1", prompt="a cat")


async def models_list(c: openai.AsyncOpenAI, up: StandinUpstream) -> Any:
    return sorted([m.id async for m in c.models.list()])  # skyroute lists its aliases


async def models_retrieve(c: openai.AsyncOpenAI, up: StandinUpstream) -> Any:
    return (await c.models.retrieve("deepseek-chat")).id


async def moderation(c: openai.AsyncOpenAI, up: StandinUpstream) -> Any:
    return await c.moderations.create(model="omni-moderation-latest", input="hello")


async def unknown_previous_response(c: openai.AsyncOpenAI, up: StandinUpstream) -> Any:
    return await c.responses.create(model="deepseek-chat", input="hi",
                                    previous_response_id="resp_0123456789abcdef01234567")


async def upstream_400(c: openai.AsyncOpenAI, up: StandinUpstream) -> Any:
    up.behaviour.mode = "bad_request"
    try:
        return await chat(c, up)
    finally:
        up.behaviour.mode = "ok"


async def upstream_429(c: openai.AsyncOpenAI, up: StandinUpstream) -> Any:
    up.behaviour.mode = "rate_limited"
    try:
        return await chat(c, up)
    finally:
        up.behaviour.mode = "ok"


CASES: list[Call | Any] = [
    chat, chat_stream, chat_tools, completion, embeddings, responses_plain, responses_stream,
    responses_previous, responses_retrieve, files_create, files_retrieve, files_content,
    files_delete, batches_create, batches_retrieve, transcription, transcription_text, speech,
    image, models_list, models_retrieve, moderation, unknown_previous_response, upstream_400,
    pytest.param(upstream_429, marks=pytest.mark.xfail(
        strict=True, reason="the class and status now match (RateLimitError, 429: see "
                            "test_upstream_429_is_a_429_both_ways), but the body is skyroute's "
                            "own give-up (code upstream_rate_limited, 'Retry after Ns' as in "
                            "Retry-After), not the upstream's")),
]


async def outcome(call: Call, client: openai.AsyncOpenAI, up: StandinUpstream) -> Any:
    """The call's normalised result, or its exception's class, status and error body."""
    try:
        result = await call(client, up)
    except openai.APIStatusError as exc:
        return type(exc).__name__, exc.status_code, exc.body
    if hasattr(result, "model_dump"):
        result = result.model_dump()
    return normalised(result)


@pytest.mark.parametrize("encoding", [None, "gzip"])
@pytest.mark.parametrize("call", CASES, ids=lambda c: getattr(c, "__name__", str(c)))
async def test_transparency_same_result_directly_and_through_skyroute(
        standin, skyroute, call: Call, encoding: str | None) -> None:
    """Each SDK call gives the same parsed result (or exception class) both ways."""
    up = await standin("us-east", models=MODELS)
    up.behaviour.content_encoding = encoding
    up.behaviour.force_encoding = True  # even to skyroute, which asks for identity
    models = "{" + ", ".join(f"{m}: {m}" for m in MODELS) + "}"
    entry = (f"  - name: us-east\n    url: {up.base_url}\n    api_key: {UPSTREAM_KEY}\n"
             f"    models: {models}\n")
    server = await skyroute(routing_yaml([entry]))
    async with openai.AsyncOpenAI(base_url=up.base_url, api_key=UPSTREAM_KEY, max_retries=0,
                                  timeout=CALL_TIMEOUT_S) as direct:
        expected = await outcome(call, direct, up)
    async with client_for(server) as through:
        got = await outcome(call, through, up)
    assert got == expected


async def test_upstream_429_is_a_429_both_ways(standin, skyroute) -> None:
    """An upstream answering 429 is the SDK's RateLimitError with status 429 directly and
    through skyroute, which adds a Retry-After."""
    up = await standin("us-east", models=MODELS)
    models = "{" + ", ".join(f"{m}: {m}" for m in MODELS) + "}"
    entry = (f"  - name: us-east\n    url: {up.base_url}\n    api_key: {UPSTREAM_KEY}\n"
             f"    models: {models}\n")
    server = await skyroute(routing_yaml([entry]))
    errors = []
    async with openai.AsyncOpenAI(base_url=up.base_url, api_key=UPSTREAM_KEY, max_retries=0,
                                  timeout=CALL_TIMEOUT_S) as direct, client_for(server) as through:
        for client in (direct, through):
            with pytest.raises(openai.RateLimitError) as caught:
                await upstream_429(client, up)
            errors.append(caught.value)
    assert [e.status_code for e in errors] == [429, 429]
    assert int(errors[1].response.headers["Retry-After"]) >= 1
