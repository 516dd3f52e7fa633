"""Reading a routing YAML file into plain values that still know their lines.

Rules / theory of operation:

* Only YAML's safe subset is read: PyYAML's parser (libyaml where installed) gives
  the events, a bounded composer here builds the node graph, and ``_Tree`` turns nodes
  into plain dicts, lists and scalars (PyYAML's safe constructor reads each scalar).
* A hostile file is one problem with a line, never a traceback or a stall: text over
  ``MAX_TEXT_BYTES``, bytes that are not UTF-8, characters YAML forbids, nesting deeper
  than ``MAX_DEPTH``, aliases that expand to more than ``MAX_ALIAS_NODES`` nodes (a
  "billion laughs" file), an alias inside its own anchor, a number beyond Python's
  4,300-digit limit, a key that is not plain text, and a key given twice (at any depth).
* A key whose value is null (``key:`` with nothing after it) is left out: it means
  "use the default", as it always has.
* ``${VAR}`` and ``${VAR:-default}`` in string values expand from the given
  environment mapping after parsing, so an expanded value never changes the structure.
  An unset ``${VAR}`` without a default is a problem at its path and line.
* ``Document`` keeps, for every path (a tuple of keys and list indexes), the line of
  its key (or list item) and the line where its value starts.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import yaml
from yaml.composer import Composer
from yaml.constructor import ConstructorError, SafeConstructor
from yaml.events import Event
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from ._errors import ConfigProblem

#: Far above any real routing file (a few KiB), far below what would hurt to parse.
MAX_TEXT_BYTES: Final = 4 * 1024 * 1024
#: A routing file nests 6 levels at most (latency.scrape.metrics.waiting[0]).
MAX_DEPTH: Final = 32
_TOO_DEEP: Final = f"nested deeper than {MAX_DEPTH} levels; a routing file needs about 6"
#: Aliases may repeat a shared block (say a models map) across many upstreams; a
#: billion-laughs file expands to millions of nodes.
MAX_ALIAS_NODES: Final = 10_000
_MERGE_TAG: Final = "tag:yaml.org,2002:merge"
_MAP_TAG: Final = "tag:yaml.org,2002:map"
_SEQ_TAG: Final = "tag:yaml.org,2002:seq"
_STR_TAG: Final = "tag:yaml.org,2002:str"
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")

YamlPath = tuple[str | int, ...]


def format_path(path: YamlPath) -> str:
    """``("upstreams", 0, "url")`` as ``upstreams[0].url``."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else part)
    return text


@dataclass(slots=True)
class Document:
    """A parsed routing file: plain values, and where each one was written."""

    data: dict[str, Any]
    key_lines: dict[YamlPath, int] = field(default_factory=dict)
    value_lines: dict[YamlPath, int] = field(default_factory=dict)
    #: Paths of strings that came out of a ``${VAR}`` expansion.
    from_env: set[YamlPath] = field(default_factory=set)
    #: Paths of strings with an unset ``${VAR}`` (already a problem; nothing more is said).
    unset_env: set[YamlPath] = field(default_factory=set)

    def line_of(self, path: YamlPath, *, value: bool = False) -> int | None:
        """The line of ``path`` (its key's, or with ``value`` where its value starts);
        for a path that was not written, the line of the closest enclosing value."""
        if value and path in self.value_lines:
            return self.value_lines[path]
        if path in self.key_lines:
            return self.key_lines[path]
        for end in range(len(path) - 1, -1, -1):
            if path[:end] in self.value_lines:
                return self.value_lines[path[:end]]
        return 1


class _Refused(Exception):
    """Reading stops: the file is hostile or broken in a way that hides the rest."""

    def __init__(self, line: int | None, message: str) -> None:
        super().__init__(message)
        self.line = line
        self.message = message


class _BoundedComposer(Composer):
    """PyYAML's composer with a nesting limit (its recursion would otherwise overflow)."""

    depth = 0
    peek_event: Callable[[], Event]  # the parser's, which the loader mixes in

    def compose_node(self, parent: Node | None, index: int) -> Node | None:
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise _Refused(mark.line + 1 if mark else None, _TOO_DEEP)
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


if yaml.__with_libyaml__:
    from yaml.cyaml import CParser as _Parser  # type: ignore[attr-defined]

    class _Loader(_BoundedComposer, _Parser, SafeConstructor, Resolver):
        def __init__(self, text: str) -> None:
            _Parser.__init__(self, text)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)
else:  # pragma: no cover - PyYAML built without libyaml
    from yaml.parser import Parser
    from yaml.reader import Reader
    from yaml.scanner import Scanner

    class _Loader(_BoundedComposer, Reader, Scanner, Parser,  # type: ignore[no-redef]
                  SafeConstructor, Resolver):
        def __init__(self, text: str) -> None:
            Reader.__init__(self, text)
            Scanner.__init__(self)
            Parser.__init__(self)
            Composer.__init__(self)
            SafeConstructor.__init__(self)
            Resolver.__init__(self)


def _line(node: Node) -> int:
    return int(node.start_mark.line) + 1


class _Tree:
    """Turns a node graph into plain values, recording lines, env expansions and problems."""

    def __init__(self, loader: _Loader, env: Mapping[str, str],
                 problems: list[ConfigProblem]) -> None:
        self.loader = loader
        self.env = env
        self.problems = problems
        self.doc = Document(data={})
        self.seen: set[int] = set()  # nodes already turned into values once
        self.open: set[int] = set()  # nodes being turned into values (an alias loop)
        self.alias_nodes = 0

    def value(self, node: Node, path: YamlPath, via_alias: bool) -> Any:
        key = id(node)
        if key in self.open:
            raise _Refused(_line(node), "an alias refers to the anchor it is inside of")
        via_alias = via_alias or key in self.seen
        self.seen.add(key)
        if via_alias:
            self.alias_nodes += 1
            if self.alias_nodes > MAX_ALIAS_NODES:
                raise _Refused(_line(node), f"aliases expand to more than {MAX_ALIAS_NODES} "
                                            "values; write the repeated part out, or share less")
        line = self.doc.value_lines[path] = node.start_mark.line + 1
        if isinstance(node, ScalarNode):
            return self.scalar(node, path, line)
        if node.tag not in (_MAP_TAG, _SEQ_TAG):  # !!set, !!omap, !!python/...
            self.problems.append(ConfigProblem(format_path(path) or "(file)", line,
                                               f"cannot read this value: tag {node.tag!r} is "
                                               "not allowed; write a plain list or mapping"))
            return None
        self.open.add(key)
        try:
            if isinstance(node, MappingNode):
                return self.mapping(node, path, via_alias)
            assert isinstance(node, SequenceNode)
            items = []
            key_lines = self.doc.key_lines
            for index, item in enumerate(node.value):
                item_path = (*path, index)
                key_lines[item_path] = item.start_mark.line + 1
                items.append(self.value(item, item_path, via_alias))
            return items
        finally:
            self.open.discard(key)

    def mapping(self, node: MappingNode, path: YamlPath, via_alias: bool) -> dict[str, Any]:
        result: dict[str, Any] = {}
        written: dict[str, int] = {}
        merged: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:  # ``<<: *defaults``: keys written here win
                for extra in self._merge_sources(value_node, path, via_alias):
                    merged.update((k, v) for k, v in extra.items() if k not in merged)
                continue
            if not isinstance(key_node, ScalarNode):
                self.problems.append(ConfigProblem(
                    format_path(path) or "(file)", _line(key_node),
                    "a key must be plain text, not a list or mapping"))
                continue
            name = str(key_node.value)
            key_path, line = (*path, name), key_node.start_mark.line + 1
            if name in written:
                self.problems.append(ConfigProblem(
                    format_path(key_path), line,
                    f"key '{name}' is given twice (first on line {written[name]}); "
                    "keep one"))
                continue
            written[name] = self.doc.key_lines[key_path] = line
            value = self.value(value_node, key_path, via_alias)
            if value is not None:
                result[name] = value
        for name, value in merged.items():
            result.setdefault(name, value)
        return result

    def _merge_sources(self, node: Node, path: YamlPath,
                       via_alias: bool) -> list[dict[str, Any]]:
        nodes = node.value if isinstance(node, SequenceNode) else [node]
        sources = []
        for source in nodes:
            value = self.value(source, path, via_alias)
            if not isinstance(value, dict):
                raise _Refused(_line(source), "'<<' merges only mappings")
            sources.append(value)
        return sources

    def scalar(self, node: ScalarNode, path: YamlPath, line: int) -> Any:
        if node.tag == _STR_TAG:  # most of a file: the text is the value (no constructor)
            value: Any = node.value
        else:
            try:
                value = self.loader.construct_object(node)
            except ConstructorError as exc:
                self.problems.append(ConfigProblem(format_path(path) or "(file)", line,
                                                   f"cannot read this value: {exc.problem}"))
                return None
            except ValueError:  # an integer past Python's 4,300-digit limit
                self.problems.append(ConfigProblem(format_path(path) or "(file)", line,
                                                   "this number has too many digits"))
                return None
        if isinstance(value, str) and "${" in value:
            value = self.expand(value, path, line)
        return value

    def expand(self, text: str, path: YamlPath, line: int) -> str:
        """``${VAR}`` and ``${VAR:-default}`` in ``text``, from the environment mapping."""

        def substitute(match: re.Match[str]) -> str:
            name, default = match.group(1), match.group(2)
            if name in self.env:
                return self.env[name]
            if default is not None:
                return default
            self.problems.append(ConfigProblem(
                format_path(path), line,
                f"environment variable {name} is not set; export it or write "
                f"${{{name}:-default}}"))
            self.doc.unset_env.add(path)
            return ""

        self.doc.from_env.add(path)
        return _ENV_REF.sub(substitute, text)


def decode(raw: bytes) -> tuple[str | None, list[ConfigProblem]]:
    """UTF-8 ``raw`` as text, or the problem naming the line of the first bad byte."""
    try:
        return raw.decode("utf-8"), []
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        return None, [ConfigProblem("(file)", line, f"byte 0x{raw[exc.start]:02x} is not "
                                                    "UTF-8 text; save the file as UTF-8")]


def read_document(text: str, env: Mapping[str, str]) -> tuple[Document | None,
                                                              list[ConfigProblem]]:
    """Parse ``text`` and expand ``${VAR}`` from ``env``.

    Returns:
        The document (None if nothing could be read) and every problem found so far.
    """
    if len(text) > MAX_TEXT_BYTES or len(text.encode("utf-8", "replace")) > MAX_TEXT_BYTES:
        return None, [ConfigProblem("(file)", None, f"the file is larger than "
                                                    f"{MAX_TEXT_BYTES // 1024 // 1024} MiB; a "
                                                    "routing file is a few KiB")]
    problems: list[ConfigProblem] = []
    loader = _Loader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, [ConfigProblem("(file)", 1, "the file is empty; see the README "
                                                     "example")]
        if not isinstance(root, MappingNode):
            return None, [ConfigProblem("(file)", _line(root),
                                        "the top level must be a mapping of keys")]
        tree = _Tree(loader, env, problems)
        tree.doc.data = tree.mapping(root, (), False)
        tree.doc.value_lines[()] = _line(root)
    except _Refused as exc:
        return None, [ConfigProblem("(file)", exc.line, exc.message)]
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = mark.line + 1 if mark is not None else None
        if "nesting depth" in str(exc.problem):  # newer PyYAML's own limit, met before ours
            return None, [ConfigProblem("(file)", line, _TOO_DEEP)]
        return None, [ConfigProblem("(file)", line, f"invalid YAML: {exc.problem}")]
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1 if isinstance(exc.position, int) else None
        char = exc.character if isinstance(exc.character, int) else ord(exc.character)
        return None, [ConfigProblem("(file)", line, f"invalid YAML: {exc.reason} "
                                                    f"(character 0x{char:02x})")]
    except yaml.YAMLError as exc:
        return None, [ConfigProblem("(file)", None, f"invalid YAML: {exc}")]
    finally:
        loader.dispose()
    return tree.doc, problems


