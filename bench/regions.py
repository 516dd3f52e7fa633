"""Benchmark: three skyroute "regions" on one machine, joined by a delay line.

Each region r1, r2, r3 is a network namespace running one ``skyroute run`` and its
stand-in upstream (``skyroute.proxy.demo``). The namespaces have no route to each
other: every byte between regions (the sync mesh and calls to another region's
upstream) passes through a userspace delay line that holds it the pair's one-way
delay (this kernel has no ``sch_netem``); ``bench/_regions_net.py`` says how. Every
region's routing file lists the three upstreams ``up-r1``..``up-r3``, its own first
(``strategy: priority``): a remote one is reached through the delay line, as a
cloud API in another region would be. ``sync`` is a full mesh with a token.

The bench reaches each region's skyroute directly (no delay), and watches each
region's ``sessions`` document through a Yjs client on ``/sync/sessions`` there
(a stock y-websocket client can join the same way). It measures, in this order:

1. Convergence per pair: each region in turn makes new sessions (one chat request
   each, ``--writes-per-s`` for ``--conv-seconds``); the time from a session
   appearing at its region to appearing at each other region, p50/p99, both
   directions of a pair together. Also the sync bytes sent per write (all links
   of all instances) and the CPU the receiving instances spent per write (their
   idle CPU over as long, measured first, subtracted). With ``--rotate-every S``
   the documents rotate every S seconds (epochs are wall-clock multiples of S), and
   writes answered within 0.3 s of a rotation are also shown on their own.
2. Follow-up affinity: 20 sessions answered at r1, each followed up at r2 (and,
   separately, r3) 0, 1, 10 and 100 ms after the first answer. "Served" counts
   follow-ups answered by the first answer's upstream; "kept" counts sessions
   whose pin, once every region agrees, is still the first answer's upstream.
3. Rate-limit admission: key ``limited`` with ``rpm: 60`` driven at ``--rl-rate``
   req/s in total (a third per region, open loop) for ``--rl-seconds``: the most
   admitted in any 60 s window, the largest number admitted in any 1 s after the
   first 60 s (the first admissions leaving the window), and admissions within
   0.5 s of a wall-clock 10 s edge against the share a steady rate would give.
4. Partition: r3 black-holed (nothing closed) for ``--cut-seconds``: seconds until
   ``/health`` and ``skyroute_sync_peers_connected`` at each region show it; sessions
   written at r1 and r3 during the cut; after the heal, seconds until every link is
   connected again and until every region has the other side's writes.

It prints a table (``--json``: one JSON object instead). It needs root for the
namespaces; without them it says why and exits 0 having run nothing (``--require``:
exit 1). Namespaces, processes and the delay line are removed on exit, after an
error and on Ctrl-C or SIGTERM too; namespaces left by a run killed with SIGKILL
are removed by the next run.

Usage: sudo python bench/regions.py [--delays r1-r2=20.5,r1-r3=76,r2-r3=61] [--short]
       [--conv-seconds 8] [--writes-per-s 25] [--rl-seconds 75] [--rl-rate 150]
       [--cut-seconds 10] [--rotate-every S] [--json] [--keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import aiohttp

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
sys.path.insert(0, str(BENCH.parent))

from _client import quantile  # noqa: E402
from _regions_fleet import (  # noqa: E402
    LIMITED_KEY,
    LINKS,
    REGIONS,
    RPM,
    Fleet,
    Namespaces,
    Observer,
    Region,
    fleet_running,
    until,
)
from _regions_net import pair_key  # noqa: E402

#: One-way delays (ms): RTTs 41 / 152 / 122 ms, as between three cloud regions.
DEFAULT_DELAYS = "r1-r2=20.5,r1-r3=76,r2-r3=61"
WINDOW_S = 60.0
AFFINITY_GAPS_MS = (0, 1, 10, 100)
SEEN_TIMEOUT_S = 30.0


# -- pure parts (tests/test_bench_regions.py) ------------------------------------------


def parse_delays(text: str, regions: Sequence[str] = REGIONS) -> dict[str, float]:
    """``"r1-r2=20.5,r1-r3=76,r2-r3=61"`` -> ``{"r1-r2": 20.5, ...}`` (one-way ms).

    A pair may be written either way round (``r2-r1``); every pair of ``regions``
    must be given exactly once.

    Raises:
        ValueError: saying which part is wrong and what is expected.
    """
    wanted = {pair_key(a, b) for i, a in enumerate(regions) for b in regions[i + 1:]}
    delays: dict[str, float] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        pair, sep, value = part.partition("=")
        ends = pair.strip().split("-")
        if not sep or len(ends) != 2 or ends[0] == ends[1] or not set(ends) <= set(regions):
            raise ValueError(f"--delays: {part!r} is not PAIR=MS with PAIR two of "
                             f"{', '.join(regions)} (e.g. r1-r2=20.5)")
        key = pair_key(*ends)
        try:
            ms = float(value)
        except ValueError:
            ms = math.nan
        if not (math.isfinite(ms) and ms >= 0):
            raise ValueError(f"--delays: {part!r}: the one-way delay must be a number of "
                             "milliseconds, 0 or more")
        if key in delays:
            raise ValueError(f"--delays: the pair {key} is given twice")
        delays[key] = ms
    if missing := sorted(wanted - set(delays)):
        raise ValueError(f"--delays: no delay for {', '.join(missing)}; give every pair "
                         f"(default {DEFAULT_DELAYS})")
    return delays


def most_in_window(times: Sequence[float], window: float) -> tuple[int, float]:
    """The most ``times`` inside any half-open window ``[t, t + window)``, and its start.

    Returns ``(0, nan)`` for no times. ``times`` need not be sorted.
    """
    ordered = sorted(times)
    best, start, lo = 0, math.nan, 0
    for hi, t in enumerate(ordered):
        while t - ordered[lo] >= window:
            lo += 1
        if hi - lo + 1 > best:
            best, start = hi - lo + 1, ordered[lo]
    return best, start


def is_near_edge(t: float, period: float, margin: float) -> bool:
    """Whether ``t`` lies within ``margin`` of a multiple of ``period``."""
    return abs(t - period * round(t / period)) < margin


def near_edges(times: Sequence[float], period: float, margin: float) -> int:
    """How many ``times`` lie within ``margin`` of a multiple of ``period``."""
    return sum(1 for t in times if is_near_edge(t, period, margin))


# -- the measurements ------------------------------------------------------------------


async def _paced(count: int, rate: float, make: Callable[[int], Any]) -> list[Any]:
    """Start ``make(i)`` for i < count at ``rate`` per second (open loop); their results."""
    started, tasks = time.monotonic(), []
    for i in range(count):
        await asyncio.sleep(max(0.0, started + i / rate - time.monotonic()))
        tasks.append(asyncio.create_task(make(i)))
    return await asyncio.gather(*tasks)


#: A write this close to a rotation (s, either side) counts as made around it.
NEAR_ROTATION_S = 0.3


def _gap_ms(here: Observer, there: Observer, session: str, answered_at: float) -> float | None:
    """From ``session``'s pin showing at its own region to showing ``there`` (None: never).

    The start is the earlier of the writer's observer seeing it and the client getting
    the answer, in case that observer was reconnecting after a rotation.
    """
    seen = there.first_seen.get(session)
    if seen is None:
        return None
    return (seen - min(here.first_seen.get(session, answered_at), answered_at)) * 1000


async def measure_convergence(fleet: Fleet, seconds: float, rate: float) -> dict[str, Any]:
    regions = list(fleet.regions.values())
    # Idle CPU first (pings, the observers' links), so writes' CPU can be told apart.
    idle_s = min(seconds, 3.0)
    cpu0 = {r.name: r.cpu_s() for r in regions}
    await asyncio.sleep(idle_s)
    idle_per_s = {r.name: (r.cpu_s() - cpu0[r.name]) / idle_s for r in regions}
    keys = [pair_key(a, b) for a in REGIONS for b in REGIONS if a < b]
    gaps: dict[str, list[float]] = {k: [] for k in keys}
    near: dict[str, list[float]] = {k: [] for k in keys}
    away: dict[str, list[float]] = {k: [] for k in keys}
    lost: dict[str, int] = dict.fromkeys(keys, 0)
    writes, bytes_out, receiver_cpu = 0, 0.0, 0.0
    for writer in regions:
        before = [await r.metrics() for r in regions]
        cpu_before = {r.name: r.cpu_s() for r in regions}
        began = time.monotonic()
        count = max(1, round(seconds * rate))
        ids = [f"conv-{writer.name}-{i}" for i in range(count)]

        async def write(i: int, writer: Region = writer, ids: list[str] = ids
                        ) -> tuple[float, float]:
            await writer.chat(session=ids[i])
            return time.monotonic(), time.time()

        answered = await _paced(count, rate, write)
        for r in regions:
            await r.observer.wait(
                lambda r=r, ids=ids: all(s in r.observer.first_seen for s in ids), SEEN_TIMEOUT_S)
        elapsed = time.monotonic() - began
        after = [await r.metrics() for r in regions]
        writes += count
        bytes_out += sum(a["bytes_out"] - b["bytes_out"] for a, b in zip(after, before,
                                                                             strict=True))
        receiver_cpu += sum(r.cpu_s() - cpu_before[r.name] - idle_per_s[r.name] * elapsed
                            for r in regions if r is not writer)
        for r in (r for r in regions if r is not writer):
            key = pair_key(writer.name, r.name)
            for s, (answer_at, wall) in zip(ids, answered, strict=True):
                gap = _gap_ms(writer.observer, r.observer, s, answer_at)
                if gap is None:
                    lost[key] += 1
                    continue
                gaps[key].append(gap)
                if fleet.rotate_every_s and is_near_edge(wall, fleet.rotate_every_s,
                                                         NEAR_ROTATION_S):
                    near[key].append(gap)
                else:
                    away[key].append(gap)
    return {
        "pairs": {k: {"one_way_ms": fleet.delays[k], "writes": len(v) + lost[k],
                      "p50_ms": quantile(v, 0.5), "p99_ms": quantile(v, 0.99),
                      "max_ms": max(v, default=math.nan), "lost": lost[k],
                      "near_rotation": len(near[k]),
                      "near_rotation_p99_ms": quantile(near[k], 0.99),
                      "near_rotation_max_ms": max(near[k], default=math.nan),
                      "away_from_rotation_p99_ms": quantile(away[k], 0.99)}
                  for k, v in gaps.items()},
        "writes": writes,
        "rotate_every_s": fleet.rotate_every_s,
        "bytes_per_write": bytes_out / writes,
        "receiver_cpu_ms_per_write": receiver_cpu / writes * 1000,
    }


async def measure_affinity(fleet: Fleet, sessions: int) -> dict[str, Any]:
    first_region = fleet.regions["r1"]
    cells: dict[tuple[int, str], list[tuple[str, str, str]]] = {}
    for gap_ms in AFFINITY_GAPS_MS:
        for other in ("r2", "r3"):
            async def conversation(i: int, gap_ms: int = gap_ms, other: str = other
                                   ) -> tuple[str, str, str]:
                session = f"aff-{gap_ms}-{other}-{i}"
                _, first = await first_region.chat(session=session)
                if gap_ms:
                    await asyncio.sleep(gap_ms / 1000)
                _, follow = await fleet.regions[other].chat(session=session)
                return session, first, follow
            cells[gap_ms, other] = list(await asyncio.gather(
                *(conversation(i) for i in range(sessions))))
    everyone = [s for rows in cells.values() for s, _, _ in rows]

    def agreed(r: Region) -> bool:
        pins = [{o.observer.upstream.get(s) for o in fleet.regions.values()} for s in everyone]
        return all(len(p) == 1 and None not in p for p in pins)

    # A pin written last by a follow-up may still be on its way; give the fleet time to agree.
    await first_region.observer.wait(lambda: agreed(first_region), SEEN_TIMEOUT_S)
    await asyncio.sleep(2 * max(fleet.delays.values()) / 1000)
    out: dict[str, Any] = {"sessions": sessions, "gaps": {}}
    for (gap_ms, other), rows in cells.items():
        final = [{o.observer.upstream.get(s) for o in fleet.regions.values()} for s, _, _ in rows]
        out["gaps"].setdefault(str(gap_ms), {})[other] = {
            "served": sum(1 for _, first, follow in rows if follow == first),
            "kept": sum(1 for (_, first, _), pins in zip(rows, final, strict=True)
                        if pins == {first}),
        }
    return out


async def measure_rate_limit(fleet: Fleet, seconds: float, rate: float) -> dict[str, Any]:
    regions = list(fleet.regions.values())
    per_region = rate / len(regions)
    count = max(1, round(seconds * per_region))
    began_mono, began_wall = time.monotonic(), time.time()

    async def one(region: Region, i: int) -> tuple[float, float, int]:
        sent = time.monotonic() - began_mono
        try:
            status, _ = await region.chat(key=LIMITED_KEY)
        except (aiohttp.ClientError, TimeoutError):
            status = 0
        return sent, began_wall + sent, status

    offsets = [i / len(regions) / per_region for i in range(len(regions))]

    async def drive(region: Region, offset: float) -> list[tuple[float, float, int]]:
        await asyncio.sleep(offset)
        return await _paced(count, per_region, lambda i: one(region, i))

    results = await asyncio.gather(*(drive(r, o) for r, o in zip(regions, offsets, strict=True)))
    rows = [row for each in results for row in each]
    admitted = [t for t, _, status in rows if status == 200]
    admitted_wall = [w for _, w, status in rows if status == 200]
    errors = sum(1 for _, _, status in rows if status not in (200, 429))
    most, most_at = most_in_window(admitted, WINDOW_S)
    later = [t for t in admitted if t >= WINDOW_S]
    burst, burst_at = most_in_window(later, 1.0)
    return {
        "rate": rate, "seconds": seconds, "requests": len(rows), "errors": errors,
        "admitted": len(admitted),
        "admitted_first_window": sum(1 for t in admitted if t < WINDOW_S),
        "most_in_60s": most, "most_in_60s_from_s": most_at,
        "first_second": sum(1 for t in admitted if t < 1.0),
        "burst_after_window": burst, "burst_after_window_at_s": burst_at,
        # The first second's burst aside: where the later admissions fall.
        "admitted_later": len(later_wall := [w for t, w in zip(admitted, admitted_wall,
                                                               strict=True) if t >= 1.0]),
        "near_10s_edges": near_edges(later_wall, 10.0, 0.5),
        "per_region": {r.name: sum(1 for _, _, s in res if s == 200)
                       for r, res in zip(regions, results, strict=True)},
    }


async def measure_partition(fleet: Fleet, cut_seconds: float, writes: int) -> dict[str, Any]:
    cut, regions = "r3", fleet.regions
    expect_during = {r: (0 if r == cut else LINKS // 2) for r in regions}
    seen_health: dict[str, float | None] = dict.fromkeys(regions)
    seen_metric: dict[str, float | None] = dict.fromkeys(regions)
    await fleet.delay_line("cut", cut)
    cut_at = time.monotonic()

    async def watch(r: Region) -> None:
        while seen_health[r.name] is None or seen_metric[r.name] is None:
            with contextlib.suppress(aiohttp.ClientError, OSError, TimeoutError, ValueError):
                now = time.monotonic() - cut_at
                if seen_health[r.name] is None and (
                        await r.links_connected() <= expect_during[r.name]):
                    seen_health[r.name] = now
                if seen_metric[r.name] is None and (
                        (await r.metrics())["peers_connected"] <= expect_during[r.name]):
                    seen_metric[r.name] = time.monotonic() - cut_at
            await asyncio.sleep(0.05)

    watchers = [asyncio.create_task(watch(r)) for r in regions.values()]
    ids = {w: [f"cut-{w}-{i}" for i in range(writes)] for w in ("r1", cut)}
    try:
        await asyncio.sleep(min(1.0, cut_seconds / 4))
        for w, sessions in ids.items():
            await asyncio.gather(*(regions[w].chat(session=s) for s in sessions))
        await asyncio.sleep(max(0.0, cut_at + cut_seconds - time.monotonic()))
    finally:
        for task in watchers:
            task.cancel()
        await asyncio.gather(*watchers, return_exceptions=True)
    await fleet.delay_line("heal", cut)
    healed_at = time.monotonic()

    async def all_connected() -> bool:
        return all([await r.links_connected() == LINKS for r in regions.values()])

    reconnected = await until(all_connected, 60.0, "links back after the heal")
    caught: dict[str, float | None] = {}
    for r in regions.values():
        others = [s for w, sessions in ids.items() if w != r.name for s in sessions]
        ok = await r.observer.wait(lambda r=r, o=others: all(s in r.observer.first_seen
                                                              for s in o), SEEN_TIMEOUT_S)
        last = max((r.observer.first_seen.get(s, healed_at) for s in others), default=healed_at)
        caught[r.name] = max(0.0, last - healed_at) if ok else None
    return {"cut": cut, "cut_seconds": cut_seconds, "seen_health_s": seen_health,
            "seen_metric_s": seen_metric, "reconnected_s": reconnected,
            "caught_up_s": caught}


# -- output ----------------------------------------------------------------------------


def _fmt(value: float | None, unit: str = "", digits: int = 1) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}{unit}"


def table(result: dict[str, Any]) -> str:
    delays = result["delays"]
    conv, aff, rl, part = (result[k] for k in ("convergence", "affinity", "rate_limit",
                                               "partition"))
    lines = [
        "skyroute across three regions (network namespaces, userspace delay line)",
        "one-way delays " + ", ".join(f"{k} {v:g} ms" for k, v in delays.items())
        + " (RTT " + " / ".join(f"{2 * v:g}" for v in delays.values()) + " ms); "
        + f"load average at start {result['load_at_start']} on {os.cpu_count()} cores",
        "",
        f"convergence: a new session's pin, from its region to the other "
        f"({conv['writes']} writes, both directions of a pair together)",
        f"  {'pair':<7}{'one-way':>9}{'writes':>8}{'p50':>9}{'p99':>9}{'max':>9}{'lost':>6}",
    ]
    rotating = conv["rotate_every_s"]
    if rotating:
        lines[-1] += f"{'near rotation: n':>18}{'p99':>9}{'max':>9}{'others p99':>12}"
    for k, p in conv["pairs"].items():
        lines.append(f"  {k:<7}{_fmt(p['one_way_ms'], ' ms'):>9}{p['writes']:>8}"
                     f"{_fmt(p['p50_ms'], ' ms'):>9}{_fmt(p['p99_ms'], ' ms'):>9}"
                     f"{_fmt(p['max_ms'], ' ms'):>9}{p['lost']:>6}")
        if rotating:
            lines[-1] += (f"{p['near_rotation']:>18}{_fmt(p['near_rotation_p99_ms'], ' ms'):>9}"
                          f"{_fmt(p['near_rotation_max_ms'], ' ms'):>9}"
                          f"{_fmt(p['away_from_rotation_p99_ms'], ' ms'):>12}")
    if rotating:
        lines.append(f"  documents rotate every {rotating:g} s; near rotation: writes within "
                     f"{NEAR_ROTATION_S:g} s of one, others: the rest")
    lines += [
        f"  per write: {conv['bytes_per_write']:.0f} sync bytes sent (all links), "
        f"{conv['receiver_cpu_ms_per_write']:.2f} ms CPU in the two receiving instances "
        "(idle subtracted)",
        "",
        f"follow-up affinity: first answer at r1, follow-up at another region after a gap "
        f"(of {aff['sessions']} sessions)",
        f"  {'gap':<8}{'r2 served':>11}{'r2 kept':>9}{'r3 served':>11}{'r3 kept':>9}",
    ]
    n = aff["sessions"]
    for gap, cells in aff["gaps"].items():
        lines.append(f"  {gap + ' ms':<8}{cells['r2']['served']:>8}/{n}{cells['r2']['kept']:>6}/{n}"
                     f"{cells['r3']['served']:>8}/{n}{cells['r3']['kept']:>6}/{n}")
    lines += [
        "  served: the follow-up was answered by the first answer's upstream; kept: the pin"
        " every region agrees on is still it",
        "",
        f"rate limit: rpm {RPM}, {rl['rate']:g} req/s over the 3 regions for {rl['seconds']:g} s "
        f"({rl['requests']} requests, {rl['errors']} neither 200 nor 429)",
        f"  most admitted in any 60 s window: {rl['most_in_60s']} (from t = "
        f"{_fmt(rl['most_in_60s_from_s'], ' s')}); in the first 60 s: "
        f"{rl['admitted_first_window']}; in the first second: {rl['first_second']}",
        "  per region: " + ", ".join(f"{k} {v}" for k, v in rl["per_region"].items()),
    ]
    if rl["seconds"] > WINDOW_S:
        lines.append(f"  largest burst in 1 s after the first 60 s: {rl['burst_after_window']} "
                     f"(at t = {_fmt(rl['burst_after_window_at_s'], ' s')})")
    share = rl["near_10s_edges"] / rl["admitted_later"] * 100 if rl["admitted_later"] else math.nan
    lines += [
        f"  admitted after the first second: {rl['admitted_later']}, of them within 0.5 s of a "
        f"wall-clock 10 s edge: {rl['near_10s_edges']} ({_fmt(share, ' %', 0)}; "
        "a steady rate: 10 %)",
        "",
        f"partition: {part['cut']} black-holed for {part['cut_seconds']:g} s (nothing closed)",
        f"  {'region':<8}{'/health':>9}{'metric':>9}{'caught up':>11}",
    ]
    for r in REGIONS:
        lines.append(f"  {r:<8}{_fmt(part['seen_health_s'][r], ' s'):>9}"
                     f"{_fmt(part['seen_metric_s'][r], ' s'):>9}"
                     f"{_fmt(part['caught_up_s'][r], ' s', 2):>11}")
    lines += [
        "  /health, metric: seconds from the cut until /health and skyroute_sync_peers_connected"
        " show it ('-': not within the cut)",
        f"  after the heal: every link connected again in {part['reconnected_s']:.2f} s; caught"
        " up: the other side's writes made during the cut all seen",
    ]
    return "\n".join(lines)


async def run(args: argparse.Namespace, delays: dict[str, float], workdir: Path
              ) -> dict[str, Any]:
    # Ctrl-C and SIGTERM cancel this task, so every cleanup below runs (also when SIGINT
    # was ignored at start, as for a background job of a non-interactive shell).
    task, loop = asyncio.current_task(), asyncio.get_running_loop()
    assert task is not None
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, task.cancel)
    result: dict[str, Any] = {
        "delays": delays, "load_at_start": " ".join(f"{x:.1f}" for x in os.getloadavg())}
    async with fleet_running(delays, workdir, args.ttft, args.rotate_every) as fleet:
        result["convergence"] = await measure_convergence(fleet, args.conv_seconds,
                                                          args.writes_per_s)
        result["affinity"] = await measure_affinity(fleet, args.sessions)
        result["rate_limit"] = await measure_rate_limit(fleet, args.rl_seconds, args.rl_rate)
        result["partition"] = await measure_partition(fleet, args.cut_seconds, args.sessions)
    return result


#: option -> (default, default with --short)
SHORT: dict[str, tuple[float, float]] = {
    "conv_seconds": (8.0, 2.0), "sessions": (20, 5), "rl_seconds": (75.0, 10.0),
    "cut_seconds": (10.0, 5.0)}


def _args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--delays", default=DEFAULT_DELAYS,
                        help=f"one-way delay per pair, ms (default {DEFAULT_DELAYS})")
    parser.add_argument("--short", action="store_true",
                        help="a quick run: 2 s of writes per region, 5 sessions, 10 s of "
                             "rate limit, a 5 s cut (options given explicitly still win)")
    parser.add_argument("--conv-seconds", type=float, help="writes per region, s (default 8)")
    parser.add_argument("--writes-per-s", type=float, default=25.0)
    parser.add_argument("--sessions", type=int, help="per affinity cell (default 20)")
    parser.add_argument("--rl-seconds", type=float,
                        help="default 75: past 60 s, to see the first admissions leave the "
                             "window")
    parser.add_argument("--rl-rate", type=float, default=150.0)
    parser.add_argument("--cut-seconds", type=float, help="default 10")
    parser.add_argument("--ttft", type=float, default=0.005,
                        help="the stand-ins' time to first token, s")
    parser.add_argument("--rotate-every", type=float, metavar="S",
                        help="sync.rotate_every in seconds (default: skyroute's, 1 h); "
                             "convergence then also shows writes near a rotation")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--keep", type=Path, help="keep routing files and logs here")
    parser.add_argument("--require", action="store_true",
                        help="exit 1, not 0, when namespaces cannot be made")
    args = parser.parse_args(argv)
    for name, (full, short) in SHORT.items():
        if getattr(args, name) is None:
            setattr(args, name, short if args.short else full)
    try:
        args.delays = parse_delays(args.delays)
    except ValueError as exc:
        parser.error(str(exc))
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _args(argv)
    if (why := Namespaces.available()) is not None:
        print(f"bench/regions.py skipped: {why}", file=sys.stderr)
        return 1 if args.require else 0
    with contextlib.ExitStack() as stack:
        if args.keep is not None:
            args.keep.mkdir(parents=True, exist_ok=True)
            workdir = args.keep
        else:
            workdir = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="regions-")))
        try:
            result = asyncio.run(run(args, args.delays, workdir))
        except (KeyboardInterrupt, asyncio.CancelledError):
            print("bench/regions.py: interrupted; namespaces and processes removed",
                  file=sys.stderr)
            return 130
        except RuntimeError as exc:
            print(f"bench/regions.py: {exc}", file=sys.stderr)
            return 1
    print(json.dumps(result) if args.json else table(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
