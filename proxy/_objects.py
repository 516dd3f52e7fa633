"""Stateful objects stay with their upstream: which ids a request names, which it creates.

Rules
-----
* Created: a 2xx answer to ``POST`` on a creating endpoint (``/files``, ``/uploads``,
  ``/batches``, ``/responses``, ``/vector_stores``, ``/assistants``, ``/threads``,
  ``/threads/runs``, ``/fine_tuning/jobs``, ``/conversations``, ``/containers``)
  names the new object in its ``id``; a Responses stream names it in its
  ``response.created`` event. That id -> the answering upstream goes into the
  shared ``ObjectDirectory`` (statesync), with ``objects.ttl``.
* Named: a later request names objects in its path (``/files/file-abc/content``,
  ``/threads/thread_1/runs``) and in its body (``previous_response_id``,
  ``file_id``, ``file_ids``, ``input_file_id``, ``training_file``,
  ``vector_store_ids``, ``assistant_id``, ``thread_id``, ``conversation``, and
  ``file_id`` inside Responses ``input`` items). The first one the directory knows
  decides the upstream; ids it does not know are left to normal routing.
* Only those paths are looked at: chat, completions and embeddings name no object,
  so the hot path costs one set lookup.
"""

from __future__ import annotations

import json
import re
import time
from typing import Any, Final

import structlog
from skyroute.routing import Config, Router
from skyroute.statesync import ObjectDirectory

from ._errors import UpstreamError
from ._metrics import Metrics

log = structlog.get_logger("skyroute.proxy")

#: Endpoints (below /v1) whose POST creates an object named by the answer's ``id``.
CREATING: Final = frozenset({"/files", "/uploads", "/batches", "/responses", "/vector_stores",
                             "/assistants", "/threads", "/threads/runs", "/fine_tuning/jobs",
                             "/conversations", "/containers"})
#: Endpoints that never name a stored object.
_STATELESS: Final = frozenset({"/chat/completions", "/completions", "/embeddings",
                               "/moderations", "/images/generations", "/audio/speech",
                               "/audio/transcriptions", "/audio/translations", "/models"})
#: Body fields that name one object, or a list of them.
_ID_FIELDS: Final = ("previous_response_id", "file_id", "input_file_id", "training_file",
                     "validation_file", "assistant_id", "thread_id", "conversation")
_ID_LIST_FIELDS: Final = ("file_ids", "vector_store_ids")
#: A path segment that looks like an object id: a known prefix and a long tail.
_PATH_ID: Final = re.compile(
    r"^(?:file-|file_|batch_|resp_|vs_|asst_|thread_|run_|msg_|ftjob-|upload_|conv_|cntr_|"
    r"step_)[A-Za-z0-9_-]{6,}$")
_CREATED_ID: Final = re.compile(rb'"id"\s*:\s*"([^"]{1,200})"')


def _path_of(path_qs: str) -> str:
    return path_qs.partition("?")[0].rstrip("/")


def named_ids(path_qs: str, payload: dict[str, Any] | None) -> list[str]:
    """The object ids a request names, in the path first, then in the body."""
    path = _path_of(path_qs)
    if path in _STATELESS or path == "":
        return []
    ids = [segment for segment in path.split("/") if _PATH_ID.match(segment)]
    if payload:
        for field in _ID_FIELDS:
            value = payload.get(field)
            if isinstance(value, str) and value:
                ids.append(value)
            elif isinstance(value, dict) and isinstance(value.get("id"), str):
                ids.append(str(value["id"]))  # Responses' conversation object
        for field in _ID_LIST_FIELDS:
            value = payload.get(field)
            if isinstance(value, list):
                ids.extend(v for v in value if isinstance(v, str) and v)
        items = payload.get("input")
        if isinstance(items, list):
            ids.extend(_input_file_ids(items))
    return ids


def _input_file_ids(items: list[Any]) -> list[str]:
    """``file_id`` of Responses ``input_file`` parts (one level into messages)."""
    found: list[str] = []
    for item in items:
        if not isinstance(item, dict):
            continue
        content = item.get("content")
        parts: list[Any] = content if isinstance(content, list) else [item]
        found.extend(str(part["file_id"]) for part in parts
                     if isinstance(part, dict) and isinstance(part.get("file_id"), str))
    return found


def creates_object(method: str, path_qs: str) -> bool:
    """Whether a successful answer to this request creates a stored object."""
    return method == "POST" and _path_of(path_qs) in CREATING


def created_id(body: bytes) -> str | None:
    """The ``id`` of the object a JSON answer (or a Responses stream's opening) carries."""
    head = body[:4096]
    if head.lstrip().startswith(b"{"):
        try:
            value = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            value = None
        if isinstance(value, dict) and isinstance(value.get("id"), str):
            return str(value["id"])
    match = _CREATED_ID.search(head)  # response.created: {"response": {"id": ...}}
    return match.group(1).decode("utf-8", "replace") if match else None


def holder_of(directory: ObjectDirectory, ids: list[str], router: Router,
              metrics: Metrics, *, now: float) -> str | None:
    """The upstream holding the first known object among ``ids``; None: route as usual.

    Raises:
        UpstreamError: 503 naming the upstream when it is out (no other has the object).
    """
    wall = time.time()  # entries are stamped with the clock every instance shares
    for object_id in ids:
        upstream = directory.upstream_of(object_id, now=wall)
        if upstream is None:
            continue
        if upstream not in router.config.upstream_names:
            log.warning("object_upstream_unknown", object_id=object_id, upstream=upstream,
                        hint="the upstream holding it is no longer in the routing file; "
                             "the request is routed as usual")
            return None
        refusal = router.pinned_unavailable(upstream, object_id, now=now)
        if refusal is not None:
            metrics.object_affinity.labels("unavailable").inc()
            raise UpstreamError(refusal.message, status=refusal.status,
                                retry_after_s=refusal.retry_after_s)
        metrics.object_affinity.labels("routed").inc()
        return upstream
    return None


def remember_created(directory: ObjectDirectory, body: bytes | None, upstream: str,
                     config: Config, metrics: Metrics) -> None:
    """Remember the object a successful creating call made (see ``creates_object``)."""
    object_id = created_id(body) if body else None
    if object_id is None:
        return
    directory.remember(object_id, upstream, now=time.time(), ttl_s=config.objects.ttl_s,
                       max_entries=config.objects.max_entries)
    metrics.object_affinity.labels("remembered").inc()
    log.debug("object_remembered", object_id=object_id, upstream=upstream)
