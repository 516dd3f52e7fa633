"""bench/faults.py runs as a user runs it, on a short trace: the benchmark itself keeps working.

Only outcomes are asserted (the table's error counts), never timings.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from .conftest import run_script

FAULTS = Path(__file__).resolve().parent.parent / "bench" / "faults.py"
TIMEOUT_S = 180


@pytest.mark.timeout(TIMEOUT_S + 30)
async def test_faults_bench_runs_and_skyroute_hides_the_fault():
    returncode, out, err = await run_script(
        str(FAULTS), "--requests", "6", "--only", "a 503, b busy, c ok", timeout_s=TIMEOUT_S)
    assert returncode == 0, err.decode()[-3000:]
    rows = {tuple(cell.strip() for cell in line.split("|")[1:4])
            for line in out.decode().splitlines() if line.startswith("| a 503")}
    # (scenario, via, errors): through skyroute every request is answered; directly, none.
    assert rows == {("a 503, b busy, c ok", "skyroute", "0"),
                    ("a 503, b busy, c ok", "direct", "6")}, out.decode()
