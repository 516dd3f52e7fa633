"""bench/soak.py for 60 seconds, as CI runs it: two peered instances, faults changing.

The soak runs as its own process, as a user runs it (``python bench/soak.py``); two
``skyroute run`` processes, three stand-in upstreams whose faults change every few seconds
(never all down at once) and a fixed-rate openai SDK load. Only outcomes are asserted,
never timings: the machine may be loaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from .conftest import run_script

SOAK = Path(__file__).resolve().parent.parent / "bench" / "soak.py"
DURATION_S = 60
#: Start-up, the load, the last answers (a busy wait or two) and shutdown, with room for a
#: loaded machine.
TIMEOUT_S = 300


@pytest.mark.soak
@pytest.mark.timeout(TIMEOUT_S + 30)
async def test_soak_has_no_client_errors_and_no_silent_truncations():
    """A minute of mixed traffic while upstream faults keep changing: every answer whole."""
    returncode, out, err = await run_script(
        str(SOAK), "--duration", str(DURATION_S), "--json", timeout_s=TIMEOUT_S)
    assert out, f"the soak printed nothing (exit {returncode}):\n{err.decode()[-3000:]}"
    summary = json.loads(out.decode().strip().splitlines()[-1])
    assert summary["requests"] == DURATION_S * 10, summary
    assert summary["client_errors"] == 0, summary
    assert summary["silent_truncations"] == 0, summary
    assert summary["fault_changes"] >= 5, summary
    assert returncode == 0, err.decode()[-3000:]
