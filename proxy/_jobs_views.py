"""Records of the job store as the API shows them: OpenAI's shapes for files and batches."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from skyroute.routing import BUSY_STATUSES

from ._jobs_store import CANCELLED, DONE, EXPIRED, QUEUED


def _status_of(job: Mapping[str, Any]) -> str:
    state = job["state"]
    if state == QUEUED:
        return "queued"
    if state == DONE:
        ok = job["status"] is not None and 200 <= job["status"] < 300 and not job["error"]
        return "completed" if ok else "failed"
    if state in (CANCELLED, EXPIRED):
        return "cancelled"
    return "in_progress"


def job_view(job: Mapping[str, Any], *, base: str | None) -> dict[str, Any]:
    """An async job: its status and, once done, the answer (JSON, or text if not JSON)."""
    view: dict[str, Any] = {
        "id": job["id"], "object": "async.job", "status": _status_of(job),
        "method": job["method"], "path": job["path"],
        "created_at": int(job["created_at"]),
        "completed_at": int(job["finished_at"]) if job.get("finished_at") else None,
        "tries": job.get("tries", 0)}
    if base is not None:
        view["status_url"] = f"{base}/v1/async/jobs/{job['id']}"
    if job.get("status") is not None and job["state"] == DONE:
        view["response"] = {"status_code": job["status"], "body": _body(job.get("response"))}
    if job.get("error"):
        view["error"] = {"message": job["error"]}
    return view


def _body(raw: bytes | None) -> Any:
    if not raw:
        return None
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        return raw.decode("utf-8", "replace")


def file_view(record: Mapping[str, Any]) -> dict[str, Any]:
    return {"id": record["id"], "object": "file", "bytes": record["bytes"],
            "created_at": int(record["created_at"]), "filename": record["filename"],
            "purpose": record["purpose"], "status": "processed", "expires_at": None,
            "status_details": None}


_TIMES = ("created_at", "in_progress_at", "expires_at", "finalizing_at", "completed_at",
          "failed_at", "expired_at", "cancelling_at", "cancelled_at")


def batch_view(record: Mapping[str, Any]) -> dict[str, Any]:
    view: dict[str, Any] = {
        "id": record["id"], "object": "batch", "endpoint": record["endpoint"],
        "errors": json.loads(record["errors"]) if record["errors"] else None,
        "input_file_id": record["input_file_id"],
        "completion_window": record["completion_window"], "status": record["status"],
        "output_file_id": record["output_file_id"], "error_file_id": record["error_file_id"],
        "request_counts": record["request_counts"],
        "metadata": json.loads(record["metadata"]) if record["metadata"] else None}
    for name in _TIMES:
        view[name] = int(record[name]) if record[name] is not None else None
    return view


def result_line(row: Mapping[str, Any]) -> tuple[bool, bytes]:
    """One line of a batch's output (True) or error (False) file, in OpenAI's format."""
    custom_id = row["custom_id"]
    response: dict[str, Any] | None = None
    error: dict[str, Any] | None = None
    ok = False
    if row["state"] == DONE and row["status"] is not None:
        response = {"status_code": row["status"], "request_id": row["id"],
                    "body": _body(row["response"])}
        ok = 200 <= row["status"] < 300
        if not ok and row["status"] in BUSY_STATUSES:  # retried until jobs.max_retries
            error = {"code": "retries_exhausted", "message": row["error"]}
    elif row["state"] == DONE:
        try:
            detail = json.loads(row["error"])
            error = {"code": detail["code"], "message": detail["message"],
                     "line": detail.get("line")}
        except (ValueError, KeyError, TypeError):
            error = {"code": "request_failed", "message": row["error"]}
    elif row["state"] == CANCELLED:
        error = {"code": "batch_cancelled", "message": "the batch was cancelled before this "
                                                       "request ran"}
    else:
        error = {"code": "batch_expired", "message": "this request could not be executed "
                                                     "before the completion window (24h) ended"}
    line = {"id": row["id"], "custom_id": custom_id, "response": response, "error": error}
    return ok, json.dumps(line, separators=(",", ":")).encode() + b"\n"
