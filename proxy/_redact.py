"""Keeping secrets out of logs: redaction of anything that looks like a key.

Rules / theory of operation
---------------------------
Two nets, both applied to every string value of every structured log event
(``redact_processor``, installed by ``configure_logging``):

* **Known secrets.** Every secret the running configuration holds (client keys,
  upstream keys, the admin key, the sync token) is registered with
  ``register_secrets`` when an app is built or a config reloaded, and replaced by
  ``[redacted]`` wherever it appears. The registry is process-wide, as the log
  configuration it serves is. The secrets are searched for together with one
  Aho-Corasick automaton (``pyahocorasick``), so a log line costs one pass over its
  text whether 1 or 100,000 secrets are registered (a regex alternation of them all
  cost a search per secret and seconds to compile).
* **Key-shaped text.** ``Bearer <token>``, ``sk-...``-style API keys, JWTs,
  ``token=``/``key=`` query values, URL userinfo (``://user:pw@``) and long
  random-looking tokens are replaced even when skyroute has never seen them
  (an upstream that echoes someone's key in its error text, say).

Redaction is a net, not the plan: upstream error text is never logged in the
first place (``proxy._forward`` reduces it to a category and a status).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, MutableMapping
from typing import Any
from urllib.parse import urlsplit

import ahocorasick
from skyroute.routing import Config

REDACTED = "[redacted]"
#: Types of values that cannot hold a secret: the fast path needs no search of them.
_NUMBERS = frozenset({int, float, bool, type(None)})
#: Secrets shorter than this are not registered: replacing "a" everywhere would
#: garble the log while protecting nothing (config validation asks for real keys).
MIN_SECRET_LENGTH = 6

_PATTERNS = (
    (re.compile(r"\b([Bb]earer|[Bb]asic|BEARER)\s+[A-Za-z0-9._~+/=-]+"), rf"\1 {REDACTED}"),
    (re.compile(r"\b(sk|pk|rk)[-_][A-Za-z0-9._-]{6,}"), rf"\1-{REDACTED}"),
    (re.compile(r"\beyJ[A-Za-z0-9_-]{6,}\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]*"), REDACTED),
    (re.compile(r"([?&;](?:token|key|api[-_]?key|access_token|secret|password)=)[^&#\s\"']+"),
     rf"\1{REDACTED}"),
    (re.compile(r"(://)[^/@\s:]*:[^/@\s]*@"), rf"\1{REDACTED}@"),
)
#: Substrings every match of ``_PATTERNS`` contains: checking them is far cheaper than
#: the patterns (which Python's ``re`` tries at every word boundary), and most log
#: lines contain none.
_MARKERS = ("earer", "EARER", "asic", "sk-", "sk_", "pk-", "pk_", "rk-", "rk_", "eyJ", "=",
            "://")
#: Whether a text holds any of ``_MARKERS``: one search instead of one per marker.
_ANY_MARKER = re.compile("|".join(re.escape(marker) for marker in _MARKERS))
#: A run of token characters long enough to be a key; ``_is_random`` decides.
_RUN = re.compile(r"[A-Za-z0-9_-]{32,}")

_known: set[str] = set()
#: Every known secret, as a word of one automaton (the value is its length). Replaced
#: whole on each registration, never changed in place, so a line being redacted on
#: another thread always sees a finished automaton.
_automaton: ahocorasick.Automaton | None = None


def register_secrets(secrets: Iterable[str | None]) -> None:
    """Redact each of ``secrets`` from every log line from now on."""
    global _automaton, _check
    new = {s for s in secrets if s and len(s) >= MIN_SECRET_LENGTH} - _known
    if not new:
        return
    _known.update(new)
    automaton = ahocorasick.Automaton()
    for secret in _known:
        automaton.add_word(secret, len(secret))
    automaton.make_automaton()
    _automaton = automaton
    _check = _check_automaton(_known)


def _check_automaton(secrets: Iterable[str]) -> ahocorasick.Automaton:
    """One automaton of every known secret and every marker: whether a text needs the
    slow path is one pass over it, not a pass for the secrets and a regex for the markers."""
    automaton = ahocorasick.Automaton()
    for word in (*secrets, *_MARKERS):
        automaton.add_word(word, 0)
    automaton.make_automaton()
    return automaton


#: The known secrets and ``_MARKERS`` together, for ``_needs_redaction``'s check only
#: (``_replace_known`` must see secrets alone: a marker could shadow one).
_check: ahocorasick.Automaton = _check_automaton(())


def _replace_known(text: str) -> str:
    """``text`` with every registered secret replaced, leftmost-longest first (so a
    secret that contains another is replaced whole)."""
    automaton = _automaton
    if automaton is None:
        return text
    parts: list[str] = []
    pos = 0
    for end, length in automaton.iter_long(text):
        parts += (text[pos:end - length + 1], REDACTED)
        pos = end + 1
    if not parts:
        return text
    parts.append(text[pos:])
    return "".join(parts)


def config_secrets(config: Config) -> list[str | None]:
    """Every secret ``config`` holds: keys, tokens, and passwords written into URLs."""
    secrets: list[str | None] = [config.admin_key, config.sync.token if config.sync else None]
    secrets += [key.key for key in config.api_keys or ()]
    for upstream in config.upstreams:
        secrets.append(upstream.api_key)
        secrets += [urlsplit(url).password for url in upstream.endpoints]
    if config.jobs is not None:
        secrets.append(config.jobs.webhook_secret)
        if config.jobs.redis is not None:
            secrets.append(urlsplit(config.jobs.redis.url).password)
    return secrets


def redact(text: str) -> str:
    """``text`` with known secrets and key-shaped strings replaced by ``[redacted]``."""
    text = _replace_known(text)
    if _ANY_MARKER.search(text) is not None:
        for pattern, replacement in _PATTERNS:
            text = pattern.sub(replacement, text)
    return _RUN.sub(_token, text)


def _is_random(run: str) -> bool:
    """Upper case, lower case and digits mixed: a random token, not a word, a number or a
    hex id (request ids are lower-case hex and stay readable)."""
    return run.lower() != run and run.upper() != run and any(c.isdigit() for c in run)


def _token(match: re.Match[str]) -> str:
    return REDACTED if _is_random(match.group()) else match.group()


def _needs_redaction(texts: list[str]) -> bool:
    """Whether any of ``texts`` holds a known secret, a marker or a random-looking run."""
    text = "\n".join(texts)
    if next(_check.iter(text), None) is not None:
        return True
    # A random run has an upper-case letter: only a text that lower() changes can hold
    # one (``_is_random``; the run is ASCII, so lower() changes it letter by letter).
    # Most values (paths, hex request ids) have none, and the run search is the costly part.
    return any(_is_random(m.group()) for t in texts if t.lower() != t
               for m in _RUN.finditer(t))


def _redact_value(value: Any, depth: int = 0) -> Any:
    if isinstance(value, str):
        return redact(value)
    if depth > 4:
        return value
    if isinstance(value, dict):
        return {k: _redact_value(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_redact_value(v, depth + 1) for v in value)
    if isinstance(value, BaseException):
        return redact(f"{type(value).__name__}: {value}")
    return value


#: Fields skyroute's own processors write (the event's name is always a literal in
#: the code, the level and time are formatted here): they cannot hold a secret, so
#: they are not searched, and never garbled by a short secret that happens to match.
OWN_FIELDS = frozenset({"event", "level", "timestamp"})


def redact_processor(logger: Any, method: str,
                     event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: redact every value of the event (run it last before rendering).

    Every value that could hold a secret is searched: every string but ``OWN_FIELDS``,
    and everything inside a value that is not a plain string or number (a list, a dict,
    an exception). Numbers, booleans and None cannot hold one (a secret is text).
    """
    # Fast path, taken by almost every line: one search over the flat string values.
    texts = []
    for key, value in event_dict.items():
        kind = type(value)  # exact types: a str subclass takes the slow path
        if kind is str:
            if key not in OWN_FIELDS:
                texts.append(value)
        elif kind not in _NUMBERS:
            break
    else:
        if not texts or not _needs_redaction(texts):
            return event_dict
    for key, value in event_dict.items():
        if key not in OWN_FIELDS:
            event_dict[key] = _redact_value(value)
    return event_dict
