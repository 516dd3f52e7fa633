"""Exceptions raised by the routing core.

One root, ``RoutingError``, so callers can catch everything this package raises.
``ConfigError`` carries every problem found in a routing YAML file, each with its
YAML path and line, so a user can fix them all in one edit.
"""

from __future__ import annotations

from dataclasses import dataclass


class RoutingError(Exception):
    """Root of every error raised by ``routing``."""


class RoutingStateError(RoutingError):
    """An event arrived that the state machine cannot take in its current state.

    The machine's state is left unchanged.
    """


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    """One thing wrong with a routing file: where it is and what to do about it."""

    path: str
    line: int | None
    message: str

    def __str__(self) -> str:
        where = f"line {self.line}: " if self.line is not None else ""
        return f"{where}{self.path}: {self.message}"


class ConfigError(RoutingError):
    """The routing file is invalid; ``problems`` lists every fault found."""

    def __init__(self, source: str, problems: list[ConfigProblem]) -> None:
        self.source = source
        self.problems = problems
        lines = "\n".join(f"  {source}:{p.line or '?'}: {p.path}: {p.message}" for p in problems)
        super().__init__(f"{len(problems)} problem(s) in {source}:\n{lines}")
