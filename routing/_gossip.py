"""Health gossip: which upstream findings instances share, and which they take from peers.

Rules / Theory of operation
---------------------------
Some failures cost every instance the same failed call before it learns them on
its own: a bad key or an empty balance (401/402), and an upstream that answers
nothing at all (its circuit opened on connect errors). Those two states,
``GOSSIPED``, are shared; ``open`` and ``slow`` are not, since they depend on
the load and the network path of each instance.

* **Publish**: an instance that finds an upstream in a gossiped state reports it,
  for as long as it expects the state to last (``DEFAULT_REPORT_S`` when it
  cannot tell), unless a report about that upstream is already in force (the
  first report stands; a second would only churn the shared document).
* **Adopt**: a report in force about a configured upstream, in a gossiped state,
  is taken over for the time it has left, unless this instance already sees the
  upstream in that state. Reports in any other state (a foreign writer may store
  anything) are ignored.
* **Withdraw**: a report about an upstream that has answered here since
  (``Finding.answering``: its latest news here is an answer, after any failure and
  after any peer's report, e.g. a panic try that got one) is out of date. It is
  removed from the store rather than adopted, so a recovered upstream is not kept
  out for the rest of the report's time, nor adopted again every round.

Times: reports carry the store's clock (wall-clock seconds, the only clock
instances share); ``now`` is that clock. What this instance knows comes in as
seconds from now, and an adopted report goes out as seconds from now, so the
caller applies it on its own clock. Nothing here reads a clock or the store.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final, Protocol

from ._health import UpstreamState

#: States worth telling other instances about: they cost every instance a failed call.
GOSSIPED: Final = frozenset({UpstreamState.BAD_KEY, UpstreamState.DOWN})
#: How long a report lasts when the finder cannot say, and how long a report with no
#: end is taken over for (it is re-read every health tick, so it is renewed while it
#: stands): a minute keeps a peer's finding without pinning it for good.
DEFAULT_REPORT_S: Final = 60.0


class Report(Protocol):
    """A peer's report about one upstream, as the shared store keeps it."""

    @property
    def state(self) -> str: ...
    @property
    def until(self) -> float | None: ...  # on the store's clock; None: until cleared
    @property
    def reporter(self) -> str: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Finding:
    """What this instance sees of one upstream now."""

    state: UpstreamState
    for_s: float | None = None  # how long it expects the state to last; None: cannot tell
    #: it answered here after its last failure here and after the last peer report taken
    #: (``UpstreamHealth.is_answering``): a report about it is older than that answer.
    answering: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class Publish:
    """Report ``upstream`` in ``state`` to every instance until ``until`` (store clock)."""

    upstream: str
    state: UpstreamState
    until: float


@dataclass(frozen=True, slots=True, kw_only=True)
class Adopt:
    """Take a peer's report: mark ``upstream`` in ``state`` for ``for_s`` seconds from now."""

    upstream: str
    state: UpstreamState
    for_s: float
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class Withdraw:
    """Remove the report about ``upstream`` from the store: it answered here since."""

    upstream: str


Decision = Publish | Adopt | Withdraw


def gossip_decisions(findings: Mapping[str, Finding], reports: Mapping[str, Report], *,
                     now: float) -> list[Decision]:
    """What to publish and what to adopt, from this instance's findings and the reports.

    Args:
        findings: every configured upstream's state here, by name.
        reports: the reports in force in the shared store, by upstream name.
        now: the store's clock (the clock of ``Report.until``).

    Returns:
        ``Publish`` values first, then ``Adopt`` or ``Withdraw`` values, at most one
        decision per upstream.
    """
    decisions: list[Decision] = [
        Publish(upstream=name, state=finding.state,
                until=now + (finding.for_s if finding.for_s is not None else DEFAULT_REPORT_S))
        for name, finding in findings.items()
        if finding.state in GOSSIPED and name not in reports]
    for name, report in reports.items():
        state = _gossiped(report.state)
        if name not in findings or state is None:
            continue
        if findings[name].answering:  # it answered here since: the report is out of date
            decisions.append(Withdraw(upstream=name))
            continue
        left = report.until - now if report.until is not None else DEFAULT_REPORT_S
        if left > 0 and findings[name].state is not state:
            decisions.append(Adopt(upstream=name, state=state, for_s=left,
                                   reason=f"reported by instance {report.reporter}"))
    return decisions


def _gossiped(state: str) -> UpstreamState | None:
    """The gossiped state a report names, or None for anything else."""
    try:
        parsed = UpstreamState(state)
    except ValueError:
        return None
    return parsed if parsed in GOSSIPED else None
