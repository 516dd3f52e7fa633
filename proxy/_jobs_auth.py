"""Who a job's loopback call runs as: the client key that submitted the job.

The job runner (``proxy._jobs_runner``) sends each job to its own instance with the
instance's job token and the name of the submitting client key; a call with the
right token is served as that client (its limits, its cache scope), one with a
wrong token is refused as a wrong API key would be. The token lives in
``jobs.data_dir``, so only processes sharing that directory know it.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Final

from aiohttp import web
from skyroute.routing import ApiKey

from ._errors import InvalidApiKey
from ._state import Runtime

JOB_TOKEN_HEADER: Final = "X-Skyroute-Job-Token"
JOB_CLIENT_HEADER: Final = "X-Skyroute-Job-Client"


@dataclass(slots=True)
class JobToken:
    """The token this instance's job calls carry ("" until the job store has started)."""

    value: str = ""


JOBS_TOKEN = web.AppKey("jobs_token", JobToken)
#: Set on a request that ``job_caller`` accepted: the job runner's own call.
JOB_CALL = web.RequestKey("job_call", bool)


def job_caller(request: web.Request, runtime: Runtime) -> ApiKey | None:
    """The client key a job's call runs as (None when auth is off).

    Raises:
        InvalidApiKey: the token is wrong, or the key that submitted the job is gone
            from ``auth.api_keys``.
    """
    expected = request.app[JOBS_TOKEN].value if JOBS_TOKEN in request.app else ""
    given = request.headers.get(JOB_TOKEN_HEADER, "")
    if not expected or not hmac.compare_digest(given.encode(), expected.encode()):
        raise InvalidApiKey("incorrect job token; only skyroute's own job runner sends "
                            f"{JOB_TOKEN_HEADER}")
    request[JOB_CALL] = True
    keys = runtime.config.api_keys
    if keys is None:
        return None
    name = request.headers.get(JOB_CLIENT_HEADER, "")
    for key in keys:
        if key.name == name:
            return key
    raise InvalidApiKey(f"the API key {name!r} that submitted this job is no longer in "
                        "auth.api_keys")
