"""Regenerate the files derived from the routing file's model.

``python -m skyroute.proxy.regenerate`` (from the repository root) rewrites the
``routing`` part of ``helm/values.schema.json`` and the settings table in README.md's
"The routing file" from the model in ``skyroute.routing``; ``--check`` only says
which of them differ (exit 1), as the test suite does.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from skyroute.routing.schema import settings_table, with_routing_schema

HELM_VALUES_SCHEMA = Path("helm/values.schema.json")
README = Path("README.md")
TABLE_BEGIN = ("<!-- settings table: generated from the model by "
               "`python -m skyroute.proxy.regenerate`; edit the model, not this table -->")
TABLE_END = "<!-- end of settings table -->"


def helm_values_schema(current: str) -> str:
    """The chart's values schema (text) with its ``routing`` part generated."""
    return json.dumps(with_routing_schema(json.loads(current)), indent=2) + "\n"


def readme_with_table(current: str) -> str:
    """README.md (text) with the generated settings table between its markers.

    Raises:
        ValueError: the markers are missing.
    """
    start, end = current.find(TABLE_BEGIN), current.find(TABLE_END)
    if start < 0 or end < start:
        raise ValueError(f"README.md needs the lines {TABLE_BEGIN!r} and {TABLE_END!r}")
    return current[:start] + TABLE_BEGIN + "\n\n" + settings_table() + "\n" + current[end:]


GENERATED: dict[Path, Callable[[str], str]] = {
    HELM_VALUES_SCHEMA: helm_values_schema,
    README: readme_with_table,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m skyroute.proxy.regenerate",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true",
                        help="write nothing; exit 1 if a file differs from the model")
    parser.add_argument("--repo", type=Path, default=Path("."), help="the repository root")
    args = parser.parse_args(argv)
    wanted: dict[Path, str] = {}
    try:
        for relative, generate in GENERATED.items():
            current = (args.repo / relative).read_text(encoding="utf-8")
            if generate(current) != current:
                wanted[relative] = generate(current)
    except (OSError, ValueError) as exc:
        print(f"regenerate: {exc}", file=sys.stderr)
        return 2
    stale = [str(relative) for relative in wanted]
    if not args.check:
        for relative, text in wanted.items():
            (args.repo / relative).write_text(text, encoding="utf-8")
    if stale:
        verb = "differs from the model" if args.check else "regenerated"
        print("\n".join(f"{name}: {verb}" for name in stale),
              file=sys.stderr if args.check else sys.stdout)
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.exit(main())
