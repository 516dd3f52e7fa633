"""Who a job's call runs as: the client key that submitted the job.

The job runner (``proxy._jobs_runner``) serves each job in-process through the
application's handler chain (``proxy._jobs_call``), as a ``JobRequest``: a request
built in memory, which aiohttp's server never makes, so a client cannot send one (no
header or token makes a request from a socket a job's call). It carries the name of
the submitting client key, and ``authenticate`` serves it as that client (its
limits, its cache scope).
"""

from __future__ import annotations

from aiohttp import web
from skyroute.routing import ApiKey

from ._errors import InvalidApiKey
from ._state import Runtime


class JobRequest(web.Request):
    """A job's call, made by the job runner in this process (never by the server)."""

    ATTRS = web.Request.ATTRS | frozenset(["job_owner"])
    #: The name of the client key that submitted the job ("" with auth off).
    job_owner: str = ""


def job_caller(request: JobRequest, runtime: Runtime) -> ApiKey | None:
    """The client key a job's call runs as (None when auth is off).

    Raises:
        InvalidApiKey: the key that submitted the job is gone from ``auth.api_keys``.
    """
    keys = runtime.config.api_keys
    if keys is None:
        return None
    for key in keys:
        if key.name == request.job_owner:
            return key
    raise InvalidApiKey(f"the API key {request.job_owner!r} that submitted this job is no "
                        "longer in auth.api_keys")
