"""The kinds of value a routing file holds: durations, sizes, shares, counts, flags, URLs.

Rules / theory of operation:

* Each kind is an ``Annotated`` type used by the models in ``_policies`` and ``config``.
  A before-validator turns what a user writes (``250ms``, ``16MiB``, ``20%``, ``true``,
  or the string a ``${VAR}`` expanded to) into the stored value and refuses anything
  negative, non-finite or malformed with a message that shows how to write it.
* A ``Kind`` marker in the same ``Annotated`` says, for the JSON Schema, which string
  form is accepted besides the number (so an editor accepts ``250ms``), and, for the
  README's settings table, what the kind is called and how a value is shown.
* Limits that differ per setting (``gt=0``, ``le=1``) are pydantic ``Field``
  constraints on that setting, so the JSON Schema carries them too.
* A validator raises ``invalid(message)``: the message is shown to the user as it is.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Annotated, Any, Final
from urllib.parse import urlsplit

from pydantic import AfterValidator, BeforeValidator, ConfigDict, Field, GetJsonSchemaHandler
from pydantic.json_schema import JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError

#: Every section of the routing file is a frozen pydantic dataclass with this config:
#: unknown keys are refused, and a number where text is expected is read as text.
#: Fields are named as the code uses them (``timeout_s``) and read from the YAML key
#: (``timeout``) given as their ``validation_alias``; ``parse_config`` validates by alias
#: only, while ``dataclasses.replace`` works by field name.
SECTION = ConfigDict(extra="forbid", validate_by_name=True, validate_by_alias=True,
                     coerce_numbers_to_str=True)
#: The type of every problem a value validator raises; ``_problems`` shows its message as is.
INVALID: Final = "routing_value"

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_SIZE = re.compile(r"^\s*(\d+)\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$")
_SHARE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(%)?\s*$")
_SIZE_UNITS = {None: 1, "B": 1, "KB": 1000, "KiB": 1024, "MB": 1000**2, "MiB": 1024**2,
               "GB": 1000**3, "GiB": 1024**3}
_DURATION_UNITS = {None: 1.0, "s": 1.0, "ms": 0.001, "m": 60.0, "h": 3600.0}
#: Whole numbers above this are refused: they survive JSON and CRDT state as exact numbers.
MAX_WHOLE: Final = 2**53 - 1


def invalid(message: str) -> PydanticCustomError:
    """A validation problem whose ``message`` is shown to the user unchanged."""
    return PydanticCustomError(INVALID, "{message}", {"message": message})


def _checked_number(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{value!r} is not {what}")
    try:
        number = float(value)
    except OverflowError:
        raise ValueError(f"{value} is too large for {what}") from None
    if not math.isfinite(number):
        raise ValueError(f"{value!r} is not a finite number; write {what}")
    if number < 0:
        raise ValueError(f"{value!r} is negative; write {what} of 0 or more")
    return number


def parse_duration(value: object) -> float:
    """``250ms``, ``2s``, ``10m``, ``1h`` or a bare number of seconds, as seconds.

    Raises:
        ValueError: for anything else, negative or non-finite values included.
    """
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ValueError(f"{value!r} is not a duration; write it like 250ms, 2s or 10m")
        return float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    return _checked_number(value, "a duration like 250ms, 2s or 10m")


def parse_size(value: object) -> int:
    """``16MiB``, ``512KB`` or a bare number of bytes, as bytes.

    Raises:
        ValueError: for anything else, negative or fractional values included.
    """
    if isinstance(value, str):
        match = _SIZE.match(value)
        if match is None:
            raise ValueError(f"{value!r} is not a size; write it like 16MiB, 512KB or 1048576")
        return int(match.group(1)) * _SIZE_UNITS[match.group(2)]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ValueError(f"{value!r} is not a size; write it like 16MiB, 512KB or 1048576")
    if value < 0:
        raise ValueError(f"{value!r} is negative; a size is 0 or more bytes")
    return value


def parse_share(value: object) -> float:
    """``20%`` or ``0.2``, as 0.2; between 0 % and 100 %.

    Raises:
        ValueError: for anything else.
    """
    if isinstance(value, str):
        match = _SHARE.match(value)
        if match is None:
            raise ValueError(f"{value!r} is not a share; write it like 20% or 0.2")
        share = float(match.group(1)) / (100 if match.group(2) else 1)
    else:
        share = _checked_number(value, "a share like 20% or 0.2")
    if not 0 <= share <= 1:
        raise ValueError(f"{value!r} is not between 0% and 100%")
    return share


def parse_count(value: object) -> int:
    """A whole number of at least 1 (also as the string a ``${VAR}`` expands to)."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{value!r} is not a positive whole number")
    if value > MAX_WHOLE:
        raise ValueError(f"{value} is too large (at most {MAX_WHOLE})")
    return value


def parse_flag(value: object) -> bool:
    """``true`` / ``false``; also as strings, which is what ``${VAR}`` expands to."""
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if not isinstance(value, bool):
        raise ValueError(f"{value!r} is not true or false")
    return value


def _converted(parse: Callable[[Any], Any]) -> BeforeValidator:
    def convert(value: Any) -> Any:
        try:
            return parse(value)
        except ValueError as exc:
            raise invalid(str(exc)) from None

    return BeforeValidator(convert)


@dataclass(frozen=True, slots=True)
class Kind:
    """What a kind of value is called, its forms in the JSON Schema, how it is shown."""

    name: str
    #: For numbers: a regular expression for the string form accepted besides the number.
    string_form: str | None = None
    #: For text: a regular expression the text must match (checked by the validator too).
    pattern: str | None = None
    #: Numbers of this kind are never negative (the schema says so where no limit does).
    non_negative: bool = False
    show: Callable[[Any], str] = str
    #: The whole JSON Schema, where the stored type says nothing of what is written.
    json_schema: Mapping[str, Any] | None = None

    def __get_pydantic_json_schema__(
        self, schema: CoreSchema, handler: GetJsonSchemaHandler
    ) -> JsonSchemaValue:
        if self.json_schema is not None:
            return dict(self.json_schema)
        inner = handler(schema)
        if self.non_negative and "minimum" not in inner and "exclusiveMinimum" not in inner:
            inner["minimum"] = 0
        if self.pattern is not None:
            inner["pattern"] = self.pattern
        if self.string_form is None:
            return inner
        return {"anyOf": [inner, {"type": "string", "pattern": self.string_form}]}


def show_duration(seconds: float) -> str:
    """``0.25`` as ``250ms``, ``600`` as ``10m``: the way the README writes durations."""
    for unit, size in (("h", 3600.0), ("m", 60.0), ("s", 1.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{int(seconds / size)}{unit}"
    if seconds < 1 and round(seconds * 1000, 6).is_integer():
        return f"{round(seconds * 1000)}ms"
    return f"{seconds:g}s"


def show_size(size: int) -> str:
    """``16777216`` as ``16MiB``."""
    for unit in ("GiB", "MiB", "KiB"):
        if size and size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return str(size)


def show_share(share: float) -> str:
    """``0.2`` as ``20%``."""
    return f"{share * 100:g}%"


def show_flag(flag: bool) -> str:
    return "true" if flag else "false"


#: A length of time, stored in seconds: ``250ms``, ``2s``, ``10m``, ``1h`` or bare seconds.
Duration = Annotated[float, _converted(parse_duration), Kind(
    "duration", string_form=r"^\s*[0-9]+(\.[0-9]+)?\s*(ms|s|m|h)?\s*$", non_negative=True,
    show=show_duration)]
#: A number of bytes: ``16MiB``, ``512KB`` or bare bytes.
Size = Annotated[int, _converted(parse_size), Kind(
    "size", string_form=r"^\s*[0-9]+\s*(B|KB|KiB|MB|MiB|GB|GiB)?\s*$", non_negative=True,
    show=show_size)]
#: A share of a whole, stored as 0..1: ``20%`` or ``0.2``.
Share = Annotated[float, _converted(parse_share), Field(ge=0, le=1), Kind(
    "share", string_form=r"^\s*[0-9]+(\.[0-9]+)?\s*%\s*$", show=show_share)]
#: A whole number of at least 1.
Count = Annotated[int, _converted(parse_count), Field(ge=1, le=MAX_WHOLE), Kind("count")]
#: ``true`` or ``false``.
Flag = Annotated[bool, _converted(parse_flag), Kind("true/false", show=show_flag)]


_HTTP_URL = r"^https?://"
_WS_URL = r"^wss?://"
_URL_PATH = r"^/"
_REDIS_URL = r"^(rediss?|unix)://"
_METRIC_NAME = r"^[a-zA-Z_:][a-zA-Z0-9_:]*$"


def _http_url(url: str) -> str:
    if re.match(_HTTP_URL, url) is None:
        raise invalid(f"{url!r} must start with http:// or https://")
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        raise invalid(f"a user or password in the URL is not allowed (it would show in "
                      f"/health, /metrics and logs): write {parts.scheme}://{parts.hostname}"
                      f"{parts.path} and put the upstream's key in api_key")
    return url.rstrip("/")


def _ws_url(url: str) -> str:
    if re.match(_WS_URL, url) is None:
        raise invalid(f"peer {url!r} must start with ws:// or wss://")
    return url


def _redis_url(url: str) -> str:
    if re.match(_REDIS_URL, url) is None:
        raise invalid(f"{url!r} must start with redis://, rediss:// or unix:// "
                      "(e.g. redis://127.0.0.1:6379/0)")
    return url


def _url_path(path: str) -> str:
    if re.match(_URL_PATH, path) is None:
        raise invalid(f"{path!r} must start with / (it is taken from each endpoint's "
                      "scheme://host:port)")
    return path


def is_metric_name(name: str) -> bool:
    """Whether ``name`` is a valid Prometheus metric name."""
    return re.match(_METRIC_NAME, name) is not None


def _metric_name(name: str) -> str:
    if not is_metric_name(name):
        raise invalid(f"{name!r} is not a Prometheus metric name (e.g. vllm:num_requests_waiting)")
    return name


#: An HTTP(S) base URL with no user or password in it; a trailing ``/`` is dropped.
HttpUrl = Annotated[str, AfterValidator(_http_url), Kind("URL", pattern=_HTTP_URL)]
#: A peer's WebSocket URL.
WsUrl = Annotated[str, AfterValidator(_ws_url), Kind("URL", pattern=_WS_URL)]
#: A Redis server: ``redis://host:port/db``, ``rediss://`` (TLS) or ``unix://`` (a socket).
#: A password in it is allowed (Redis has no other place for one): /health never shows it.
RedisUrl = Annotated[str, AfterValidator(_redis_url), Kind("URL", pattern=_REDIS_URL)]
#: A URL path, taken from each pool endpoint's ``scheme://host:port``.
UrlPath = Annotated[str, AfterValidator(_url_path), Kind("path", pattern=_URL_PATH)]
#: A Prometheus metric name.
MetricName = Annotated[str, AfterValidator(_metric_name), Kind("metric name",
                                                               pattern=_METRIC_NAME)]
#: Non-empty text: a name, a model alias.
Name = Annotated[str, Field(min_length=1), Kind("text")]
#: Text that may be empty.
Text = Annotated[str, Kind("text")]
