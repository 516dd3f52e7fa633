"""bench/overhead.py --short runs as CI runs it: every target answers every phase, and the
issue-14 goals are each judged. Only outcomes and shapes are asserted, never timings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import run_script

OVERHEAD = Path(__file__).resolve().parent.parent / "bench" / "overhead.py"
TIMEOUT_S = 240


@pytest.mark.timeout(TIMEOUT_S + 30)
async def test_overhead_short_measures_every_target_and_judges_every_goal(tmp_path):
    result = tmp_path / "overhead.json"
    returncode, out, err = await run_script(
        str(OVERHEAD), "--short", "--no-scaling", "--json", str(result), timeout_s=TIMEOUT_S)
    assert returncode == 0, err.decode()[-3000:]
    data = json.loads(result.read_text())
    phases = {(p["mode"], p["concurrency"], p["target"]): p for p in data["phases"]}
    assert set(phases) == {(mode, conc, target) for mode in ("json", "stream")
                           for conc in (1, 16) for target in ("direct", "bare", "skyroute")}
    for key, phase in phases.items():
        assert phase["requests"] > 0 and phase["errors"] == 0, (key, err.decode()[-3000:])
        assert (phase["ttfb_p50_ms"] is not None) == (key[0] == "stream"), key
    goals = "\n".join(data["verdicts"])
    for goal in ("added p50", "first streamed byte", "proxy CPU per request", "throughput"):
        assert goal in goals, goals
    assert "RSS per process" in out.decode()
