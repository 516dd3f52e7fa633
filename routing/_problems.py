"""Problems in a routing file, said the way a user fixes them: path, line, what to do.

Rules / theory of operation:

* ``validation_problems`` turns pydantic's errors into ``ConfigProblem``s: the error's
  location is a YAML path, its line comes from the ``Document``, and its message is
  ours: unknown keys get a did-you-mean and the keys known at that place, enum values
  get a did-you-mean and the choices, a missing key says what it is for (its
  description). Messages raised by the value kinds (``_values.invalid``) pass as they are.
* A problem with a whole section or list item (a mapping or list in the file) is
  reported on the line where it starts; a problem with a scalar on its key's line.
* ``cross_reference_problems`` checks what no single section can: route targets name
  upstreams that offer the route's model, names are unique, ``fallback_model`` chains
  end, ``jobs.targets`` names routes and upstreams offering them. It reads the parsed
  values directly, so it reports even when other sections failed validation: the user
  sees every problem in one run.
* ``repeat_problems`` refuses an item listed twice in a list where a second copy means
  nothing or is ambiguous (``_UNIQUE_LISTS``): route and job targets, a pool's endpoints,
  client keys, key and forwarded headers, peers, trusted proxies, webhook hosts. Items
  are compared as skyroute reads them (header names and hosts in any case, URLs without
  a trailing slash, CIDR blocks as networks); the second copy is the problem, with the
  line of the first.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import ipaddress
import types
import typing
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Final

from pydantic import ValidationError
from pydantic_core import ErrorDetails

from ._errors import ConfigProblem
from ._values import INVALID
from ._yaml import Document, YamlPath, format_path

_MAPPING_ERRORS = {"dataclass_type", "dataclass_exact_type", "dict_type", "mapping_type",
                   "model_type", "model_attributes_type"}
_LIST_ERRORS = {"tuple_type", "list_type", "iterable_type"}
_UNKNOWN_KEY_ERRORS = {"unexpected_keyword_argument", "extra_forbidden"}


def validation_problems(exc: ValidationError, doc: Document, root: type) -> list[ConfigProblem]:
    """Every error in ``exc`` as a problem at its YAML path and line."""
    problems = []
    for error in exc.errors():
        path, message = _explain(error, root)
        if any(path[:len(unset)] == unset for unset in doc.unset_env):
            continue  # an unset ${VAR}: that problem is reported, its empty value is not
        if error["type"] == "too_short" and _value_at(doc.data, path):
            continue  # pydantic counts only the valid items; their own problems are listed
        at_value = error["type"] not in _UNKNOWN_KEY_ERRORS \
            and isinstance(_value_at(doc.data, path), dict | list)
        problems.append(ConfigProblem(format_path(path) or "(file)",
                                      doc.line_of(path, value=at_value), message))
    return problems


def _explain(error: ErrorDetails, root: type) -> tuple[YamlPath, str]:
    kind, path, given = error["type"], tuple(error["loc"]), error.get("input")
    ctx = error.get("ctx") or {}
    if kind == INVALID:
        return path, str(ctx["message"])
    if kind in _UNKNOWN_KEY_ERRORS:
        known = _keys_of(_type_at(root, path[:-1]))
        key = str(path[-1])
        close = difflib.get_close_matches(key, sorted(known), n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return path, f"unknown key '{key}'{hint} (known keys here: {', '.join(sorted(known))})"
    if kind == "missing":
        about = _description_at(root, path)
        return path[:-1], (f"missing required key '{path[-1]}'"
                           + (f" ({_lower_first(about)})" if about else ""))
    if kind == "enum":
        choices = [str(m.value) for m in _enum_at(root, path)]
        close = difflib.get_close_matches(str(given), choices, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return path, f"'{given}' is not one of {', '.join(choices)}{hint}"
    if kind in _MAPPING_ERRORS:
        return path, f"expected a mapping of keys, got {_what(given)}"
    if kind in _LIST_ERRORS:
        return path, f"expected a list, got {_what(given)}"
    if kind == "string_type":
        return path, f"expected text, got {_what(given)}"
    if kind == "too_short" and ctx.get("min_length") == 1:
        about = _description_at(root, path)
        return path, "must not be empty" + (f" ({_lower_first(about)})" if about else "")
    if kind == "greater_than":
        return path, f"must be above {_number(ctx['gt'])}"
    if kind == "greater_than_equal":
        return path, f"must be at least {_number(ctx['ge'])}"
    if kind == "less_than_equal":
        return path, f"must be at most {_number(ctx['le'])}"
    return path, str(error["msg"])


def _lower_first(text: str) -> str:
    return text[0].lower() + text[1:] if text[1:2].islower() else text


def _number(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _what(value: object) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"[:80]


def _value_at(data: Any, path: YamlPath) -> Any:
    for part in path:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _unwrap(annotation: Any) -> Any:
    """``X`` from ``X | None`` and ``Annotated[X, ...]``."""
    while True:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            annotation = typing.get_args(annotation)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(annotation) if a is not type(None)]
            if len(args) != 1:
                return annotation
            annotation = args[0]
        else:
            return annotation


def _fields_of(section: Any) -> dict[str, Any]:
    """YAML key -> pydantic FieldInfo for a section class (fields not read from YAML left out)."""
    if not dataclasses.is_dataclass(section) or not hasattr(section, "__pydantic_fields__"):
        return {}
    infos = section.__pydantic_fields__
    return {str(infos[f.name].validation_alias or f.name): infos[f.name]
            for f in dataclasses.fields(section) if f.init}


def _keys_of(section: Any) -> set[str]:
    return set(_fields_of(section))


def _type_at(root: Any, path: YamlPath) -> Any:
    """The declared type of the value at ``path`` (None if the path leaves the model)."""
    current = root
    for part in path:
        current = _unwrap(current)
        origin = typing.get_origin(current)
        if isinstance(part, int) and origin is tuple:
            current = typing.get_args(current)[0]
        elif origin is not None and isinstance(origin, type) and issubclass(origin, Mapping):
            current = typing.get_args(current)[1]
        elif isinstance(part, str) and part in _fields_of(current):
            current = _fields_of(current)[part].annotation
        else:
            return None
    return _unwrap(current)


def _description_at(root: Any, path: YamlPath) -> str | None:
    info = _fields_of(_type_at(root, path[:-1])).get(str(path[-1]))
    return None if info is None or not info.description else info.description.rstrip(".")


def _enum_at(root: Any, path: YamlPath) -> list[enum.Enum]:
    found = _type_at(root, path)
    return list(found) if isinstance(found, type) and issubclass(found, enum.Enum) else []


# ------------------------------------------------------------------ cross references


def _items(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _text(value: Any) -> str | None:
    """A name as the model reads it (numbers are read as text)."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


def cross_reference_problems(doc: Document) -> list[ConfigProblem]:
    """Problems between sections: names, targets, model maps and fallback chains."""
    problems: list[ConfigProblem] = []

    def problem(path: YamlPath, message: str) -> None:
        problems.append(ConfigProblem(format_path(path), doc.line_of(path), message))

    upstream_models: dict[str, set[str]] = {}
    for i, upstream in enumerate(_items(doc.data.get("upstreams"))):
        name = _text(upstream.get("name")) if isinstance(upstream, dict) else None
        if name is None:
            continue
        if name in upstream_models:
            problem(("upstreams", i, "name"), f"upstream name '{name}' is used twice")
        models = upstream.get("models")
        upstream_models[name] = {str(k) for k in models} if isinstance(models, dict) else set()
    auth = doc.data.get("auth")
    for i, key in enumerate(_items(auth.get("api_keys")) if isinstance(auth, dict) else []):
        path: YamlPath = ("auth", "api_keys", i, "key")
        if isinstance(key, dict) and key.get("key") == "" and path not in doc.from_env:
            problem(path, "is empty; a client key must not be blank")
    fallbacks: dict[str, tuple[YamlPath, str]] = {}  # route model -> (path, fallback model)
    routed: set[str] = set()
    for i, route in enumerate(_items(doc.data.get("routes"))):
        if not isinstance(route, dict):
            continue
        model = _text(route.get("model"))
        if model is not None and model in routed:
            problem(("routes", i, "model"), f"model '{model}' has two routes; merge their "
                                            "targets")
        elif model is not None:
            routed.add(model)
        for j, target in enumerate(_items(route.get("targets"))):
            target_name = _text(target)
            if target_name not in upstream_models:
                known = ", ".join(sorted(upstream_models)) or "none defined"
                problem(("routes", i, "targets", j),
                        f"target {target!r} names no upstream (upstreams: {known})")
            elif model and upstream_models[target_name] \
                    and model not in upstream_models[target_name]:
                problem(("routes", i, "targets", j),
                        f"upstream '{target_name}' has no model for alias '{model}'; add "
                        f"'{model}: <its model name>' to its models")
        fallback = _text(route.get("fallback_model"))
        if model is not None and fallback:
            fallbacks.setdefault(model, (("routes", i, "fallback_model"), fallback))
    served = routed.union(*upstream_models.values())
    for model, (path, fallback) in fallbacks.items():
        message = _fallback_problem(model, fallback, fallbacks, served)
        if message:
            problem(path, message)
    jobs = doc.data.get("jobs")
    job_targets = jobs.get("targets") if isinstance(jobs, dict) else None
    for alias, names in job_targets.items() if isinstance(job_targets, dict) else ():
        for path, message in _job_target_problems(str(alias), _items(names), upstream_models,
                                                  served):
            problem(path, message)
    return problems


def _job_target_problems(alias: str, names: list[Any], upstream_models: dict[str, set[str]],
                         served: set[str]) -> list[tuple[YamlPath, str]]:
    """What is wrong with ``jobs.targets.<alias>``: the alias and each upstream named."""
    at: YamlPath = ("jobs", "targets", alias)
    if alias not in served:
        close = difflib.get_close_matches(alias, sorted(served), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return [(at, f"'{alias}' names no route{hint} (models: {', '.join(sorted(served))})")]
    found: list[tuple[YamlPath, str]] = []
    for j, target in enumerate(names):
        name = _text(target)
        if name not in upstream_models:
            known = ", ".join(sorted(upstream_models)) or "none defined"
            found.append(((*at, j), f"{target!r} names no upstream (upstreams: {known})"))
        elif upstream_models[name] and alias not in upstream_models[name]:
            found.append(((*at, j), f"upstream '{name}' has no model for alias '{alias}'; add "
                                    f"'{alias}: <its model name>' to its models"))
    return found


def _fallback_problem(model: str, fallback: str, fallbacks: dict[str, tuple[YamlPath, str]],
                      served: set[str]) -> str | None:
    """What is wrong with ``model``'s ``fallback_model``, if anything."""
    if fallback == model:
        return (f"'{fallback}' is this route's own model; name another route's model, "
                "e.g. a small model on the local pool")
    if fallback not in served:
        close = difflib.get_close_matches(fallback, sorted(served), n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        return f"'{fallback}' names no route{hint} (models: {', '.join(sorted(served))})"
    chain = [model, fallback]
    while chain[-1] in fallbacks:
        after = fallbacks[chain[-1]][1]
        if after in chain[1:]:
            return None  # a loop further on; its own routes report it
        chain.append(after)
        if after == model:
            return (f"fallbacks loop: {' -> '.join(chain)}; the last route of a chain must "
                    "have no fallback_model")
    return None


# ------------------------------------------------------------------ items listed twice


def _lower(value: Any) -> str | None:
    return value.lower() if isinstance(value, str) else None


def _url(value: Any) -> str | None:
    return value.rstrip("/") if isinstance(value, str) else None


def _network(value: Any) -> object:
    try:
        return ipaddress.ip_network(str(value), strict=False)
    except ValueError:
        return None  # not a network: validation reports it


def _client_key(value: Any) -> str | None:
    key = value.get("key") if isinstance(value, dict) else None
    return key if isinstance(key, str) and key else None  # blank: dropped or reported


_KEEP_ONE_TARGET: Final = "keep one: no upstream takes two attempts of one request"
_KEEP_ONE_HEADER: Final = "keep one (header names are compared in any case)"

#: The path of a list (``*`` for every index or key on the way) -> how its items are
#: compared (None: not comparable, left to validation), and what a second copy is told
#: (the item, where the first is). A message never shows a client key.
_UNIQUE_LISTS: Final[dict[YamlPath, tuple[Callable[[Any], object],
                                          Callable[[Any, str], str]]]] = {
    ("routes", "*", "targets"): (_text, lambda v, first: (
        f"upstream '{v}' is listed twice (first {first}); {_KEEP_ONE_TARGET} "
        "(max_attempts sets how many attempts there are)")),
    ("jobs", "targets", "*"): (_text, lambda v, first: (
        f"upstream '{v}' is listed twice (first {first}); {_KEEP_ONE_TARGET}")),
    ("upstreams", "*", "endpoints"): (_url, lambda v, first: (
        f"endpoint {v!r} is listed twice (first {first}); keep one: a pool sends each "
        "request to one server, picked by load")),
    ("upstreams", "*", "forward_headers"): (_lower, lambda v, first: (
        f"header {v!r} is listed twice (first {first}); {_KEEP_ONE_HEADER}")),
    ("auth", "key_headers"): (_lower, lambda v, first: (
        f"header {v!r} is listed twice (first {first}); {_KEEP_ONE_HEADER}")),
    ("auth", "api_keys"): (_client_key, lambda v, first: (
        f"'{v.get('name')}' has the same key as the client {first}: a request with that "
        "key could be either; give each client its own key")),
    ("sync", "peers"): (_url, lambda v, first: (
        f"peer {v!r} is listed twice (first {first}); keep one")),
    ("trusted_proxies",): (_network, lambda v, first: (
        f"{v!r} is the same network as the entry {first}; keep one")),
    ("jobs", "webhook_hosts"): (_lower, lambda v, first: (
        f"host {v!r} is listed twice (first {first}); keep one (host names are compared in "
        "any case)")),
}


def _lists_at(data: Any, pattern: YamlPath, path: YamlPath = ()) -> Iterator[
        tuple[YamlPath, list[Any]]]:
    """Each list at ``pattern`` (``*`` matches every index or key), with its path."""
    if not pattern:
        if isinstance(data, list):
            yield path, data
        return
    head, rest = pattern[0], pattern[1:]
    if head == "*":
        pairs = (enumerate(data) if isinstance(data, list)
                 else data.items() if isinstance(data, dict) else ())
        for part, value in pairs:
            yield from _lists_at(value, rest, (*path, part))
    elif isinstance(data, dict) and head in data:
        yield from _lists_at(data[head], rest, (*path, head))


def repeat_problems(doc: Document) -> list[ConfigProblem]:
    """Items listed twice in a list of ``_UNIQUE_LISTS``, each at the second copy's line."""
    problems: list[ConfigProblem] = []
    for pattern, (same, message) in _UNIQUE_LISTS.items():
        for path, items in _lists_at(doc.data, pattern):
            first: dict[object, int] = {}
            for index, item in enumerate(items):
                seen_as = same(item)
                if seen_as is None:
                    continue
                if seen_as not in first:
                    first[seen_as] = index
                    continue
                first_path = (*path, first[seen_as])
                where = f"at {format_path(first_path)}, line {doc.line_of(first_path)}"
                problems.append(ConfigProblem(format_path((*path, index)),
                                              doc.line_of((*path, index)), message(item, where)))
    return problems
