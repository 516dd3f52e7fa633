"""What the routing file's model says about itself: its JSON Schema and settings table.

Everything here is derived from the declarations in ``config`` and ``_policies``:

* ``routing_json_schema()``: the JSON Schema of a routing file (draft-07, no ``$ref``,
  so editors with yaml-language-server and Helm's validator both read it). Durations,
  sizes and shares accept their string forms (``250ms``, ``16MiB``, ``20%``), and every
  value that is not free text also accepts a ``${VAR}`` reference, which skyroute
  expands before it validates. ``skyroute schema`` prints it.
* ``with_routing_schema(values_schema)``: the Helm chart's values schema with its
  ``routing`` part replaced by the above (``helm/values.schema.json``).
* ``settings_table()``: the Markdown table of every setting in README's
  "The routing file".

Pure functions: ``python -m skyroute.proxy.regenerate`` writes the files.
"""

from __future__ import annotations

import copy
import dataclasses
import enum
import json
import typing
from collections.abc import Mapping
from typing import Any, Final

import annotated_types
from pydantic import TypeAdapter
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from ._values import MAX_WHOLE, Kind
from .config import Config

__all__ = ["ENV_REFERENCE", "routing_json_schema", "settings_table", "with_routing_schema"]

#: A string holding a ``${VAR}`` or ``${VAR:-default}`` reference.
ENV_REFERENCE: Final[Mapping[str, str]] = {
    "type": "string", "pattern": r"\$\{[A-Za-z_][A-Za-z0-9_]*(:-[^}]*)?\}",
    "description": "a ${VAR} or ${VAR:-default} reference, expanded from the environment"}
_DRAFT: Final = "http://json-schema.org/draft-07/schema#"
_META_KEYS: Final = ("description", "default", "examples")


def routing_json_schema() -> dict[str, Any]:
    """The JSON Schema of a routing file."""
    generated = TypeAdapter(Config).json_schema(by_alias=True, mode="validation")
    definitions = generated.pop("$defs", {})
    schema = _with_env_references(_inline(generated, definitions))
    return {"$schema": _DRAFT, **schema, "title": "skyroute routing file",
            "description": "The routing file of skyroute (skyroute validate FILE checks it "
                           "fully; skyroute schema prints this schema)."}


def with_routing_schema(values_schema: Mapping[str, Any]) -> dict[str, Any]:
    """The Helm chart's values schema with ``properties.routing`` generated from the model."""
    routing = {k: v for k, v in routing_json_schema().items() if k not in ("$schema", "title")}
    routing["description"] = ("The routing file (see the README), generated from skyroute's "
                              "model by python -m skyroute.proxy.regenerate. Secret values "
                              "are ${ENV_NAME} references, checked by the chart's templates.")
    result = copy.deepcopy(dict(values_schema))
    result["properties"]["routing"] = routing
    return result


def _inline(schema: Any, definitions: Mapping[str, Any]) -> Any:
    """``schema`` with every ``$ref`` replaced by its definition and titles dropped."""
    if isinstance(schema, list):
        return [_inline(item, definitions) for item in schema]
    if not isinstance(schema, dict):
        return schema
    if "$ref" in schema:
        target = definitions[schema["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in schema.items() if k != "$ref"}}
        return _inline(merged, definitions)
    return {key: (value if key in ("default", "examples", "enum", "const")
                  else _inline(value, definitions))
            for key, value in schema.items() if key != "title"}


def _is_leaf(schema: Mapping[str, Any]) -> bool:
    return schema.get("type") not in ("object", "array") and "properties" not in schema \
        and "anyOf" not in schema


def _is_free_text(schema: Mapping[str, Any]) -> bool:
    return schema.get("type") == "string" and not {"pattern", "enum", "const", "minLength"} \
        & set(schema)


def _with_env_references(schema: dict[str, Any]) -> dict[str, Any]:
    """Let every value that is not free text be a ``${VAR}`` reference too."""
    if "properties" in schema:
        schema["properties"] = {k: _with_env_references(v)
                                for k, v in schema["properties"].items()}
    if isinstance(schema.get("additionalProperties"), dict):
        schema["additionalProperties"] = _with_env_references(schema["additionalProperties"])
    if isinstance(schema.get("items"), dict):
        schema["items"] = _with_env_references(schema["items"])
    if "anyOf" in schema:
        branches = [b if _is_leaf(b) else _with_env_references(b) for b in schema["anyOf"]]
        if any(_is_leaf(b) and not _is_free_text(b) and b.get("type") != "null"
               for b in branches):
            branches.append(dict(ENV_REFERENCE))
        schema["anyOf"] = branches
        return schema
    if _is_leaf(schema) and not _is_free_text(schema):
        meta: dict[str, Any] = {k: schema.pop(k) for k in _META_KEYS if k in schema}
        return {"anyOf": [schema, dict(ENV_REFERENCE)], **meta}
    return schema


# ------------------------------------------------------------------ the settings table


@dataclasses.dataclass(frozen=True, slots=True)
class _Row:
    key: str
    kind: str
    default: str
    description: str


def settings_table() -> str:
    """Every setting of the routing file as a Markdown table: key, kind, default, meaning."""
    rows = ["| key | kind | default | what it does |", "|---|---|---|---|"]
    for row in _rows(Config, ""):
        rows.append(f"| `{row.key}` | {row.kind} | {row.default} | {row.description} |")
    return "\n".join(rows) + "\n"


def _section_fields(section: type) -> list[tuple[str, FieldInfo]]:
    infos: dict[str, FieldInfo] = section.__pydantic_fields__  # type: ignore[attr-defined]
    return [(str(infos[f.name].validation_alias or f.name), infos[f.name])
            for f in dataclasses.fields(section) if f.init]


def _rows(section: type, prefix: str) -> list[_Row]:
    rows = []
    for key, info in _section_fields(section):
        inner, optional = _strip_optional(info.annotation)
        origin = typing.get_origin(inner)
        if dataclasses.is_dataclass(inner) and not _kind(info):
            rows += _rows(typing.cast(type, inner), f"{prefix}{key}.")
            continue
        if origin is tuple and dataclasses.is_dataclass(typing.get_args(inner)[0]) \
                and not _kind(info):
            rows += _rows(typing.get_args(inner)[0], f"{prefix}{key}[].")
            continue
        rows.append(_Row(f"{prefix}{key}", _kind_text(info, inner),
                         _default_text(info, optional), _cell(info.description or "")))
    return rows


def _strip_optional(annotation: Any) -> tuple[Any, bool]:
    args = typing.get_args(annotation)
    if type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else annotation), True
    return annotation, False


def _kind(info: FieldInfo) -> Kind | None:
    """The field's ``Kind``, also from inside ``X | None``."""
    inner, _ = _strip_optional(info.annotation)
    found = [m for m in [*info.metadata, *getattr(inner, "__metadata__", ())]
             if isinstance(m, Kind)]
    return found[-1] if found else None


def _item_kind(annotation: Any) -> Kind | None:
    found = [m for m in getattr(annotation, "__metadata__", ()) if isinstance(m, Kind)]
    return found[-1] if found else None


#: Limits every value of a kind has (a count is >= 1, a share <= 1): not repeated per row.
_IMPLIED_LIMITS: Final = {(">=", 0), (">=", 1), ("<=", 1), ("<=", MAX_WHOLE)}


def _limits(info: FieldInfo) -> str:
    parts = []
    for item in info.metadata:
        for sign, cls, attr in ((">", annotated_types.Gt, "gt"), (">=", annotated_types.Ge, "ge"),
                                ("<", annotated_types.Lt, "lt"), ("<=", annotated_types.Le, "le")):
            if isinstance(item, cls) and (sign, getattr(item, attr)) not in _IMPLIED_LIMITS:
                value = getattr(item, attr)
                parts.append(f"{sign} {value:g}" if isinstance(value, float) else f"{sign} {value}")
    return ", ".join(parts)


def _kind_text(info: FieldInfo, annotation: Any) -> str:
    kind = _kind(info)
    origin = typing.get_origin(annotation)
    if kind is not None:
        text = kind.name
    elif isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        text = " \\| ".join(f"`{m.value}`" for m in annotation)
    elif origin is typing.Literal:
        text = " \\| ".join(f"`{value}`" for value in typing.get_args(annotation))
    elif origin is tuple:
        item = _item_kind(typing.get_args(annotation)[0])
        text = f"list of {item.name if item else 'text'}"
    elif origin is not None and issubclass(origin, Mapping):
        text = "mapping of text"
    else:
        text = "text"
    limits = _limits(info)
    return f"{text}, {limits}" if limits else text


def _default_text(info: FieldInfo, optional: bool) -> str:
    if info.default is PydanticUndefined and info.default_factory is None:
        return "required"
    value = info.default if info.default is not PydanticUndefined else \
        info.default_factory()  # type: ignore[call-arg, misc]
    if value is None:
        return "unset" if optional else "none"
    if isinstance(value, tuple | dict | Mapping) and not value:
        return "none"
    kind = _kind(info)
    if isinstance(value, enum.Enum):
        shown = str(value.value)
    elif isinstance(value, tuple):
        shown = ", ".join(value)
    elif kind is not None:
        shown = kind.show(value)
    else:
        shown = json.dumps(value) if not isinstance(value, str) else value
    return f"`{_cell(shown)}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")
