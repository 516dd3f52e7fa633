"""The stand-in upstream in its own process, answering at once (ttft 0, token delay 0).

Usage: python bench/_upstream.py API_KEY [TOKENS]
Prints {"url": "<base_url ending in /v1>"} on stdout, then serves until terminated.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from skyroute.proxy.demo import Behaviour, StandinUpstream


async def main(key: str, tokens: int) -> None:
    up = StandinUpstream("bench", models=("deepseek-chat",), api_key=key,
                         behaviour=Behaviour(ttft_s=0.0, token_delay_s=0.0, tokens=tokens))
    await up.start(port=0)
    print(json.dumps({"url": up.base_url}), flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await up.aclose()


if __name__ == "__main__":
    uvloop.run(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 5))
