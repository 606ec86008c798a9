"""Permanent store faults, told apart from the transient ones the store clients retry.

gcsfs, s3fs, botocore and google-cloud-storage (Beam's GCS filesystem) retry 429, 500,
503 and dropped connections themselves: a run survives those, and dn2 never records them
as errored images. What no retry mends is the store refusing the run itself: access
denied (403) on a listing or on the output, a bucket that does not exist. Each client
says so in its own exception type; permanent_fault() finds any of them in an
exception's chain, so the command line ends the run with one line instead of a traceback
(pipelines.common), and StoreError says it where dn2 calls the store itself.
"""

from __future__ import annotations

from dn2ops.errors import UserError

# botocore's error codes for a refusal that no retry mends.
_S3_DENIED = ("AccessDenied", "AllAccessDisabled", "InvalidAccessKeyId",
              "SignatureDoesNotMatch", "AccountProblem")


class StoreError(UserError, OSError):
    """The store refused a request for good: no such bucket, access denied."""


def _chain(e: BaseException | None):
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


def _status(e: BaseException) -> int | str | None:
    """The HTTP status or error code a client exception carries, if any."""
    response = getattr(e, "response", None)
    if isinstance(response, dict):  # botocore's ClientError
        code = response.get("Error", {}).get("Code")
        return code or response.get("ResponseMetadata", {}).get("HTTPStatusCode")
    if response is not None and isinstance(getattr(response, "status_code", None), int):
        return response.status_code  # google-cloud-storage's InvalidResponse
    code = getattr(e, "code", None)  # google.api_core's and gcsfs's HttpError
    if isinstance(code, int):
        return code
    ints = [a for a in getattr(e, "args", ())[:2] if isinstance(a, int) and a >= 400]
    return ints[0] if ints else None


def _first_line(e: BaseException) -> str:
    """The first line of the client's own words (Beam's S3 errors carry them in
    ``args[0]``; google-cloud-storage's upload errors have none: only the status)."""
    args = getattr(e, "args", ())
    text = (args[0] if len(args) > 1 and isinstance(args[0], str) else str(e)).strip()
    if not text or text.startswith("("):
        return f"HTTP {_status(e)}" if _status(e) else type(e).__name__
    return text.splitlines()[0]


def permanent_fault(e: BaseException) -> str | None:
    """A one-line reason when ``e`` (or an exception it was raised from) is a store's
    permanent refusal: access denied or no such bucket; None for anything else."""
    for x in _chain(e):
        if isinstance(x, StoreError):
            return str(x)
        status = _status(x)
        denied = (status == 403 or status in _S3_DENIED or isinstance(x, PermissionError)
                  or _first_line(x).startswith("Forbidden"))
        if denied:
            return (f"access denied ({_first_line(x)}); check that this account may list "
                    "and read the inputs and write the output")
        if status == "NoSuchBucket":
            return f"the bucket does not exist ({_first_line(x)})"
    return None
