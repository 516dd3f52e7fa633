"""bench/ratelimits.py runs as a user runs it, briefly: three instances behind delay lines
keep one key's rpm with shares (the benchmark itself keeps working).

Only outcomes are asserted (what was admitted), never timings.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from .conftest import run_script

BENCH = Path(__file__).resolve().parent.parent / "bench" / "ratelimits.py"
TIMEOUT_S = 120


@pytest.mark.timeout(TIMEOUT_S + 30)
async def test_ratelimits_bench_runs_and_shares_keep_the_rpm():
    returncode, out, err = await run_script(
        str(BENCH), "--short", "--seconds", "3", "--rate", "60", "--rpm", "12",
        "--delay-scale", "0.2", timeout_s=TIMEOUT_S)
    assert returncode == 0, err.decode()[-3000:]
    text = out.decode()
    summary = re.search(r"most admitted in any 60 s window: (\d+) before, (\d+) with shares",
                        text)
    assert summary is not None, text
    assert int(summary.group(2)) == 12, text  # exactly the rpm: 4 at each instance
    assert "(s1/s2/s3 4/4/4)" in text, text
