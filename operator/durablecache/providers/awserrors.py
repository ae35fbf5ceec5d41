"""AWS errors -> durablecache errors, each with the AWS message, none retried by us.

Throttling is retried inside botocore (``retries={"mode": "adaptive"}``: client-side rate limiting
plus exponential backoff); what reaches this module has already exhausted those retries. Quota,
invalid-parameter and access-denied answers are final: retrying cannot make them succeed, so they
become clear failures that stop the migration with the reason AWS gave.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    ParamValidationError,
)

from ..errors import ConnectError, DurableCacheError, RefusedError, ServerError, UsageError


class AwsError(ServerError):
    """An AWS answer we cannot work around. ``code`` is AWS's error code."""

    retryable = False

    def __init__(self, message: str, code: str = "", operation: str = ""):
        super().__init__(message)
        self.code = code
        self.operation = operation


class AwsAccessDenied(AwsError, ConnectError):
    """The credentials lack a permission (see deploy/iam-policy.json)."""


class AwsQuotaExceeded(AwsError, RefusedError):
    """An account or cluster quota; ask AWS for more or request fewer nodes."""


class AwsInvalidRequest(AwsError, UsageError):
    """AWS refused a parameter or a combination of them."""


class AwsNotFound(AwsError, UsageError):
    """The named replication group or snapshot does not exist."""


class AwsThrottled(AwsError):
    """Still throttled after botocore's adaptive retries; the caller may try again later."""

    retryable = True


ACCESS_DENIED = {
    "AccessDenied", "AccessDeniedException", "UnauthorizedOperation", "InvalidClientTokenId",
    "SignatureDoesNotMatch", "ExpiredToken", "ExpiredTokenException", "UnrecognizedClientException",
    "AuthFailure", "MissingAuthenticationToken",
}
THROTTLED = {"Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequestsException"}
NOT_FOUND_SUFFIXES = ("NotFound", "NotFoundFault")
# NodeQuotaForClusterExceeded, NodeQuotaForCustomerExceeded, ClusterQuotaForCustomerExceeded,
# NodeGroupsPerReplicationGroupQuotaExceeded, ReplicationGroupQuotaExceeded, ...
QUOTA_MARKERS = ("Quota", "InsufficientCacheClusterCapacity", "LimitExceeded")
INVALID_PREFIXES = ("InvalidParameter", "Invalid", "ValidationError", "MissingParameter")


def classify(code: str) -> type[AwsError]:
    if code in ACCESS_DENIED:
        return AwsAccessDenied
    if code in THROTTLED:
        return AwsThrottled
    if any(m in code for m in QUOTA_MARKERS) and ("Exceeded" in code or "Insufficient" in code):
        return AwsQuotaExceeded
    if code.endswith(NOT_FOUND_SUFFIXES):
        return AwsNotFound
    if code.startswith(INVALID_PREFIXES):
        return AwsInvalidRequest
    return AwsError


def from_client_error(exc: ClientError, operation: str, secrets: tuple[str, ...] = ()) -> AwsError:
    err = exc.response.get("Error", {})
    code = str(err.get("Code") or "Unknown")
    aws_message = redact(str(err.get("Message") or "").strip(), secrets)
    cls = classify(code)
    hint = ""
    if cls is AwsAccessDenied:
        hint = " (grant it: see deploy/iam-policy.json)"
    elif cls is AwsQuotaExceeded:
        hint = " (request a quota increase or ask for fewer nodes)"
    elif cls is AwsThrottled:
        hint = " (still throttled after adaptive retries; try again later)"
    message = f"AWS {operation} failed: {code}: {aws_message or 'no message'}{hint}"
    return cls(message, code=code, operation=operation)


def redact(text: str, secrets: tuple[str, ...]) -> str:
    for s in secrets:
        if s:
            text = text.replace(s, "***")
    return text


def call(client: Any, operation: str, secrets: tuple[str, ...] = (), **params: Any) -> dict[str, Any]:
    """Call one ElastiCache operation by its API name (``CreateReplicationGroup``) and map failures.

    ``secrets`` are blanked from any message (an AWS message should never echo a token, but a
    message that did would otherwise end up in a Kubernetes Event).
    """
    method: Callable[..., dict[str, Any]] = getattr(client, _snake(operation))
    try:
        return method(**params)
    except ClientError as exc:
        raise from_client_error(exc, operation, secrets) from None
    except NoCredentialsError:
        raise ConnectError("no AWS credentials found: the standard chain (environment, IRSA or EKS Pod "
                           "Identity, instance profile) gave none") from None
    except NoRegionError:
        raise UsageError("no AWS region: pass --region or set AWS_REGION") from None
    except EndpointConnectionError as exc:
        raise ConnectError(f"cannot reach the ElastiCache API: {exc}") from None
    except ParamValidationError as exc:
        raise UsageError(f"invalid {operation} request: {redact(str(exc), secrets)}") from None
    except BotoCoreError as exc:
        raise ConnectError(f"AWS {operation} failed: {redact(str(exc), secrets)}") from None


def _snake(operation: str) -> str:
    from botocore import xform_name

    return xform_name(operation)


def is_code(exc: DurableCacheError, *codes: str) -> bool:
    return isinstance(exc, AwsError) and exc.code in codes
