"""What the benchmarks' client does: one chat completion through the openai SDK, and quantiles.

Benchmarks run as scripts (``python bench/NAME.py``), so this directory is on ``sys.path``
and they import it as ``_client``.
"""

from __future__ import annotations

import statistics

import openai


async def chat_text(client: openai.AsyncOpenAI, model: str, messages: list[dict[str, str]],
                    *, stream: bool) -> tuple[str, str | None]:
    """The answer's text and finish reason, streamed or not; SDK errors propagate."""
    if stream:
        chunks = await client.chat.completions.create(model=model, messages=messages,
                                                      stream=True)
        text, finish = "", None
        async for chunk in chunks:
            for choice in chunk.choices:
                text += choice.delta.content or ""
                finish = choice.finish_reason or finish
        return text, finish
    reply = await client.chat.completions.create(model=model, messages=messages)
    return reply.choices[0].message.content or "", reply.choices[0].finish_reason


def quantile(values: list[float], q: float) -> float:
    """The ``q`` quantile (0.5, 0.99, ...) of ``values``; NaN for none."""
    if len(values) < 2:
        return values[0] if values else float("nan")
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]
