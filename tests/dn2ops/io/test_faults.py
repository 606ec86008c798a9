"""dn2ops.io.faults on the exceptions the store clients really raise (built here)."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError
from google.api_core import exceptions as google

from dn2ops.io.faults import StoreError, permanent_fault


def _boto(code: str, status: int) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": code},
                        "ResponseMetadata": {"HTTPStatusCode": status}}, "ListObjectsV2")


@pytest.mark.parametrize("error, reason", [
    (_boto("AccessDenied", 403), "access denied (An error occurred (AccessDenied) when "
                                 "calling the ListObjectsV2 operation: AccessDenied)"),
    (_boto("NoSuchBucket", 404), "the bucket does not exist (An error occurred"),
    (google.Forbidden("caller does not have storage.objects.list access"),
     "access denied (403 caller does not have storage.objects.list access)"),
    (OSError("Forbidden: b/bucket/o\nno access"), "access denied (Forbidden: b/bucket/o)"),
    (PermissionError(13, "Permission denied"), "access denied ([Errno 13] Permission denied)"),
    (StoreError("cannot take the lease on gs://b/out: ..."),
     "cannot take the lease on gs://b/out: ..."),
])
def test_permanent_refusals_are_named(error, reason):
    assert permanent_fault(error).startswith(reason)


@pytest.mark.parametrize("error", [
    _boto("SlowDown", 503), _boto("InternalError", 500), google.ServiceUnavailable("busy"),
    google.TooManyRequests("slow down"), FileNotFoundError("gs://b/image.png"),
    ValueError("a bug"), ConnectionResetError(104, "reset")])
def test_transient_faults_and_other_errors_are_not(error):
    assert permanent_fault(error) is None


def test_a_refusal_is_found_in_the_chain():
    try:
        try:
            raise google.Forbidden("no access")
        except google.Forbidden as e:
            raise RuntimeError("the pipeline failed") from e
    except RuntimeError as e:
        assert permanent_fault(e) == ("access denied (403 no access); check that this "
                                      "account may list and read the inputs and write the "
                                      "output")
