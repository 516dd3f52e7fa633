"""bench/regions.py: its pure parts, and a very short run where namespaces can be made.

The run needs root (network namespaces); without it the test is skipped, as CI skips the
bench. Only outcomes are asserted (every write arrives, affinity holds, nothing but 200 and
429, the state catches up after a heal), never timings: the machine may be loaded.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from skyroute.routing import parse_config

BENCH = Path(__file__).resolve().parent.parent / "bench" / "regions.py"
_spec = importlib.util.spec_from_file_location("bench_regions", BENCH)
assert _spec is not None and _spec.loader is not None
regions = importlib.util.module_from_spec(_spec)
sys.modules["bench_regions"] = regions
_spec.loader.exec_module(regions)
#: The fleet harness, imported by the bench from its own directory.
fleet = sys.modules["_regions_fleet"]

#: Start-up of three instances, four short phases and the shutdown, on a loaded machine.
RUN_TIMEOUT_S = 150


@pytest.mark.parametrize(("text", "expected"), [
    (regions.DEFAULT_DELAYS, {"r1-r2": 20.5, "r1-r3": 76.0, "r2-r3": 61.0}),
    ("r2-r1=1, r3-r1=0 ,r3-r2=2.5,", {"r1-r2": 1.0, "r1-r3": 0.0, "r2-r3": 2.5}),
])
def test_parse_delays_reads_every_pair_either_way_round(text, expected):
    """Pairs are unordered, spaces and a trailing comma are fine."""
    assert regions.parse_delays(text) == expected


@pytest.mark.parametrize(("text", "says"), [
    ("r1-r2=20,r1-r3=70", "no delay for r2-r3"),
    ("r1-r2=20,r2-r1=30,r1-r3=1,r2-r3=1", "r1-r2 is given twice"),
    ("r1-r2=fast,r1-r3=1,r2-r3=1", "milliseconds, 0 or more"),
    ("r1-r2=-1,r1-r3=1,r2-r3=1", "milliseconds, 0 or more"),
    ("r1-r9=1,r1-r3=1,r2-r3=1", "two of r1, r2, r3"),
    ("r1-r1=1", "two of r1, r2, r3"),
    ("r1r2=1", "is not PAIR=MS"),
])
def test_parse_delays_says_what_is_wrong(text, says):
    """A wrong --delays names the part and what is expected."""
    with pytest.raises(ValueError, match=says):
        regions.parse_delays(text)


def test_args_short_sets_only_what_was_not_given():
    """--short shortens every phase, but an option given on the command line still wins."""
    args = regions._args(["--short", "--conv-seconds", "10"])
    assert (args.conv_seconds, args.sessions, args.rl_seconds, args.cut_seconds) == (
        10.0, 5, 10.0, 5.0)
    args = regions._args([])
    assert (args.conv_seconds, args.sessions, args.rl_seconds, args.cut_seconds) == (
        8.0, 20, 75.0, 10.0)


def test_most_in_window_slides_over_unsorted_times():
    """The busiest half-open window may start at any time, not only at the first."""
    times = [120.0, 60.1, 0.0, 59.9, 0.5, 60.0]
    assert regions.most_in_window(times, 60.0) == (4, 0.5)
    assert regions.most_in_window(times, 1.0) == (3, 59.9)
    count, start = regions.most_in_window([], 60.0)
    assert count == 0 and math.isnan(start)


def test_near_edges_counts_times_within_the_margin_of_a_period():
    """9.6 and 10.4 are near 10, 20.49 near 20; 15 is not, and 19.5 is just outside."""
    assert regions.near_edges([9.6, 10.4, 15.0, 19.5, 20.49], 10.0, 0.5) == 3
    assert regions.is_near_edge(0.1, 2.0, 0.3) and not regions.is_near_edge(1.0, 2.0, 0.3)


@pytest.mark.parametrize("region", fleet.REGIONS)
def test_routing_file_is_a_valid_routing_file(region):
    """Each region's generated file loads, its own upstream first, peered with the others."""
    config = parse_config(fleet.routing_file(region, 5.0), source=f"<{region}>", env={})
    assert config.routes[0].targets[0] == f"up-{region}"
    assert len(config.sync.peers) == len(fleet.REGIONS) - 1
    assert config.sync.rotate_every_s == 5.0


async def test_regions_short_run_converges_keeps_pins_and_catches_up(tmp_path):
    """Three namespaced regions for a few seconds, documents rotating every 2 s: the bench's
    JSON shows every write arrived (its observers follow rotations), every pin kept, only
    200/429 from the limited key, and state caught up after the cut."""
    if (why := regions.Namespaces.available()) is not None:
        pytest.skip(f"bench/regions.py cannot run here: {why}")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, str(BENCH), "--json", "--keep", str(tmp_path), "--conv-seconds", "1",
        "--writes-per-s", "10", "--sessions", "3", "--rl-seconds", "3", "--rl-rate", "60",
        "--cut-seconds", "4", "--rotate-every", "2",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(RUN_TIMEOUT_S):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.terminate()  # the bench removes its namespaces and processes on SIGTERM
        await proc.wait()
        raise
    assert proc.returncode == 0, err.decode()[-3000:]
    result = json.loads(out.decode().strip().splitlines()[-1])
    conv, aff, rl, part = (result[k] for k in ("convergence", "affinity", "rate_limit",
                                               "partition"))
    assert {p["lost"] for p in conv["pairs"].values()} == {0}, conv
    assert conv["writes"] == 30 and conv["bytes_per_write"] > 0, conv
    assert conv["rotate_every_s"] == 2 and all(
        math.isnan(p["near_rotation_p99_ms"]) == (p["near_rotation"] == 0)
        for p in conv["pairs"].values()), conv
    assert all(cell["kept"] == 3 for cells in aff["gaps"].values() for cell in cells.values()), aff
    assert rl["errors"] == 0 and 0 < rl["admitted"] < rl["requests"], rl
    assert None not in part["caught_up_s"].values(), part
    assert not any(p.name.startswith(f"skyroute-{proc.pid}-")
                   for p in Path("/var/run/netns").glob("*")), "namespaces left behind"
