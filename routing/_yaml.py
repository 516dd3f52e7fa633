"""Reading a routing YAML file so that every value still knows its line.

Rules / theory of operation:

* The file is parsed with PyYAML's safe loader; mappings and sequences come back
  as ``LinedDict`` / ``LinedList`` that remember the line of each key and item, so
  a problem can be reported as ``line 12: upstreams[1].url: ...``.
* ``${VAR}`` and ``${VAR:-default}`` in string scalars expand from the environment
  after parsing, so an expanded value can never change the YAML structure.
  A ``${VAR}`` with no default whose variable is unset is a problem, reported with
  its path and line, not an empty string sent to an upstream.
* ``Fields`` reads one mapping: typed getters record problems instead of raising,
  so ``validate`` can list every fault in one pass; ``finish()`` reports keys that
  nobody asked for, with a did-you-mean. ``section`` reads a whole optional
  section into a frozen dataclass from a table of (key, attribute, converter).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import yaml

from ._errors import ConfigProblem

T = TypeVar("T")

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 1000, "KiB": 1024, "MB": 1000**2, "MiB": 1024**2,
               "GB": 1000**3, "GiB": 1024**3}
_DURATION_UNITS = {None: 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "h": 3600.0, "d": 86400.0}


class LinedDict(dict[str, Any]):
    """A YAML mapping that remembers its own line and the line of each key."""

    line: int | None = None
    key_lines: dict[str, int]


class LinedList(list[Any]):
    """A YAML sequence that remembers its own line and the line of each item."""

    line: int | None = None
    item_lines: list[int]


class _LineLoader(yaml.SafeLoader):
    pass


def _construct_mapping(loader: _LineLoader, node: yaml.MappingNode) -> LinedDict:
    result = LinedDict(loader.construct_mapping(node, deep=True))
    result.line = node.start_mark.line + 1
    result.key_lines = {str(k.value): k.start_mark.line + 1 for k, _ in node.value}
    return result


def _construct_sequence(loader: _LineLoader, node: yaml.SequenceNode) -> LinedList:
    result = LinedList(loader.construct_sequence(node, deep=True))
    result.line = node.start_mark.line + 1
    result.item_lines = [item.start_mark.line + 1 for item in node.value]
    return result


_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)
_LineLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_SEQUENCE_TAG, _construct_sequence)


def parse_yaml(text: str, source: str) -> tuple[LinedDict | None, list[ConfigProblem]]:
    """Parse ``text``; return the top-level mapping, or None and the syntax problem."""
    try:
        data = yaml.load(text, Loader=_LineLoader)  # a SafeLoader subclass
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark is not None else None
        return None, [ConfigProblem("(file)", line, f"invalid YAML: {exc.problem}")]
    except yaml.YAMLError as exc:
        return None, [ConfigProblem("(file)", None, f"invalid YAML: {exc}")]
    if data is None:
        return None, [ConfigProblem("(file)", 1, "the file is empty; see the README example")]
    if not isinstance(data, LinedDict):
        return None, [ConfigProblem("(file)", 1, "the top level must be a mapping of keys")]
    return data, []


def parse_duration(value: object) -> float:
    """``250ms``, ``2s``, ``10m``, ``1h``, ``30d`` or a bare number of seconds, as seconds."""
    if isinstance(value, bool):
        raise ValueError("expected a duration such as 250ms, 2s or 10m")
    if isinstance(value, int | float):
        return float(value)
    match = _DURATION.match(str(value))
    if match is None:
        raise ValueError(f"{value!r} is not a duration; write it like 250ms, 2s or 10m")
    return float(match.group(1)) * _DURATION_UNITS[match.group(2)]


def parse_size(value: object) -> int:
    """``10MiB``, ``512KB`` or a bare number of bytes, as bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    match = _SIZE.match(str(value))
    if match is None:
        raise ValueError(f"{value!r} is not a size; write it like 10MiB, 512KB or 1048576")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


class Fields:
    """Typed, problem-collecting access to one YAML mapping at ``path``."""

    def __init__(
        self,
        data: Mapping[str, Any],
        path: str,
        problems: list[ConfigProblem],
        env: Mapping[str, str],
    ) -> None:
        self.data = data
        self.path = path
        self.problems = problems
        self.env = env
        self._seen: set[str] = set()

    def line_of(self, key: str | None = None) -> int | None:
        if key is not None and isinstance(self.data, LinedDict):
            line = self.data.key_lines.get(key)
            if line is not None:
                return line
        return getattr(self.data, "line", None)

    def at(self, key: str) -> str:
        return f"{self.path}.{key}" if self.path else key

    def problem(self, key: str | None, message: str) -> None:
        path = self.at(key) if key else (self.path or "(file)")
        self.problems.append(ConfigProblem(path, self.line_of(key), message))

    def raw(self, key: str, default: object = None, *, required: bool = False) -> Any:
        """The value under ``key`` with ``${VAR}`` expanded, or ``default``."""
        self._seen.add(key)
        if key not in self.data or self.data[key] is None:
            if required:
                self.problem(None, f"missing required key '{key}'")
            return default
        return expand_env(self.data[key], self.env, self.at(key), self.line_of(key), self.problems)

    def get(self, key: str, convert: Callable[[Any], T], default: T, *, what: str) -> T:
        """The value under ``key`` converted by ``convert``; a failure is a problem."""
        value = self.raw(key)
        if value is None:
            return default
        try:
            return convert(value)
        except (TypeError, ValueError) as exc:
            self.problem(key, f"expected {what}: {exc}")
            return default

    def text(self, key: str, default: str | None = None, *, required: bool = False) -> str | None:
        value = self.raw(key, default, required=required)
        if value is None or isinstance(value, str):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)
        self.problem(key, f"expected a string, got {type(value).__name__}")
        return default

    def mapping(self, key: str) -> Fields | None:
        value = self.raw(key)
        if value is None:
            return None
        if not isinstance(value, Mapping):
            self.problem(key, f"expected a mapping, got {type(value).__name__}")
            return None
        return Fields(value, self.at(key), self.problems, self.env)

    def items(self, key: str) -> list[tuple[str, int | None, Any]]:
        """The list under ``key`` as (path, line, item) triples; a non-list is a problem."""
        value = self.raw(key)
        if value is None:
            return []
        if not isinstance(value, list):
            self.problem(key, f"expected a list, got {type(value).__name__}")
            return []
        lines = getattr(value, "item_lines", [])
        out = []
        for i, item in enumerate(value):
            path, line = f"{self.at(key)}[{i}]", lines[i] if i < len(lines) else self.line_of(key)
            out.append((path, line, expand_env(item, self.env, path, line, self.problems)))
        return out

    def child(self, path: str, line: int | None, item: Any) -> Fields | None:
        """Fields for one list item that must itself be a mapping."""
        if not isinstance(item, Mapping):
            self.problems.append(ConfigProblem(path, line, "expected a mapping"))
            return None
        return Fields(item, path, self.problems, self.env)

    def finish(self, *, allowed: set[str] | None = None) -> None:
        """Report every key that was never read, with the closest known key."""
        known = allowed if allowed is not None else self._seen
        for key in self.data:
            if key in known:
                continue
            close = difflib.get_close_matches(str(key), sorted(known), n=1, cutoff=0.6)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            choices = ", ".join(sorted(known))
            self.problem(str(key), f"unknown key '{key}'{hint} (known keys here: {choices})")


def expand_env(
    value: Any,
    env: Mapping[str, str],
    path: str,
    line: int | None,
    problems: list[ConfigProblem],
) -> Any:
    """Expand ``${VAR}`` / ``${VAR:-default}`` in a string; other values pass unchanged.

    Mappings and lists are left alone: their scalars expand when they are read, so
    a missing variable is reported once, at its own path.
    """
    if not isinstance(value, str) or "${" not in value:
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        problems.append(ConfigProblem(
            path, line,
            f"environment variable {name} is not set; export it or write ${{{name}:-default}}",
        ))
        return ""

    return _ENV_REF.sub(substitute, value)


#: What a value should look like, for problems ("expected a duration like ...").
DURATION = "a duration like 250ms, 2s or 10m"
SHARE = "a share like 20% or 0.2"
COUNT = "a positive whole number"


def parse_share(value: object) -> float:
    """``20%`` or ``0.2`` as 0.2."""
    text = str(value).strip()
    share = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    if not 0 <= share <= 1:
        raise ValueError(f"{value!r} is not between 0% and 100%")
    return share


def parse_bool(value: Any) -> bool:
    """``true`` / ``false``; also as strings, which is what ``${VAR}`` expands to."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not true or false")
    return value


def parse_count(value: Any) -> int:
    """A whole number of at least 1."""
    number = int(value)
    if number < 1 or isinstance(value, bool | float):
        raise ValueError(f"{value!r} is not a positive whole number")
    return number


def keywords(fields: Fields, spec: dict[str, tuple[str, Any, str]]) -> dict[str, Any]:
    """Read ``spec`` (yaml key -> (attribute, converter, what)) into constructor kwargs."""
    kwargs: dict[str, Any] = {}
    for key, (attr, convert, what) in spec.items():
        value = fields.get(key, convert, None, what=what)
        if value is not None:
            kwargs[attr] = value
    return kwargs


def section(top: Fields, key: str, cls: Any, spec: dict[str, tuple[str, Any, str]],
            more_keys: tuple[str, ...] = (), **extra: Any) -> Any:
    """A whole optional section as ``cls``; problems are recorded, defaults kept."""
    fields = top.mapping(key)
    if fields is None:
        return cls(**extra)
    kwargs = keywords(fields, spec)
    fields.finish(allowed=set(spec) | set(more_keys))
    try:
        return cls(**kwargs, **extra)
    except ValueError as exc:
        fields.problem(None, str(exc))
        return cls(**extra)
