"""AWS failures become one clear, non-retrying error carrying AWS's own message."""

from __future__ import annotations

from typing import Any

import pytest
from awstest import REGION
from botocore.exceptions import ClientError

from durablecache.errors import ConnectError, RefusedError, UsageError
from durablecache.providers import awserrors
from durablecache.providers.aws import CLIENT_CONFIG, make_client
from durablecache.providers.awserrors import (
    AwsAccessDenied,
    AwsError,
    AwsInvalidRequest,
    AwsNotFound,
    AwsQuotaExceeded,
    AwsThrottled,
)


def test_invalid_parameter_from_the_server_is_a_usage_error(admin: Any) -> None:
    with pytest.raises(AwsInvalidRequest) as exc:
        awserrors.call(admin, "CreateSnapshot", SnapshotName="x")  # neither group nor cluster: refused
    assert isinstance(exc.value, UsageError) and not exc.value.retryable
    assert str(exc.value) == ("AWS CreateSnapshot failed: InvalidParameterValue: "
                              "One of CacheClusterId or ReplicationGroupId must be provided.")


def test_not_found_from_the_server(admin: Any) -> None:
    with pytest.raises(AwsNotFound, match="ReplicationGroupNotFoundFault: Replication group nope not found"):
        awserrors.call(admin, "DescribeReplicationGroups", ReplicationGroupId="nope")


def test_parameter_validation_is_a_usage_error_without_secrets(admin: Any) -> None:
    with pytest.raises(UsageError) as exc:
        awserrors.call(admin, "CreateReplicationGroup", secrets=("s3cret-token-value",),
                       ReplicationGroupId="x", AuthToken="s3cret-token-value", NumNodeGroups="many")
    assert "invalid CreateReplicationGroup request" in str(exc.value)
    assert "s3cret-token-value" not in str(exc.value)


@pytest.mark.parametrize(("code", "cls", "base"), [
    ("AccessDenied", AwsAccessDenied, ConnectError),
    ("UnrecognizedClientException", AwsAccessDenied, ConnectError),
    ("NodeQuotaForCustomerExceeded", AwsQuotaExceeded, RefusedError),
    ("ClusterQuotaForCustomerExceededFault", AwsQuotaExceeded, RefusedError),
    ("NodeGroupsPerReplicationGroupQuotaExceeded", AwsQuotaExceeded, RefusedError),
    ("InsufficientCacheClusterCapacity", AwsQuotaExceeded, RefusedError),
    ("InvalidParameterCombination", AwsInvalidRequest, UsageError),
    ("InvalidKMSKeyFault", AwsInvalidRequest, UsageError),
    ("CacheSubnetGroupNotFoundFault", AwsNotFound, UsageError),
    ("Throttling", AwsThrottled, AwsError),
    ("SomethingNew", AwsError, AwsError),
])
def test_classification(code: str, cls: type, base: type) -> None:
    err = awserrors.from_client_error(
        ClientError({"Error": {"Code": code, "Message": "the AWS words"}}, "CreateReplicationGroup"),
        "CreateReplicationGroup")
    assert type(err) is cls and isinstance(err, base)
    assert err.code == code and "the AWS words" in str(err)
    assert err.retryable is (cls is AwsThrottled)


def test_a_token_echoed_by_aws_is_blanked() -> None:
    err = awserrors.from_client_error(
        ClientError({"Error": {"Code": "InvalidParameterValue", "Message": "bad token abcdefghijklmnop1"}},
                    "CreateReplicationGroup"),
        "CreateReplicationGroup", secrets=("abcdefghijklmnop1",))
    assert "abcdefghijklmnop1" not in str(err) and "bad token ***" in str(err)


def test_throttling_is_retried_by_botocore_in_adaptive_mode(moto_url: str) -> None:
    client = make_client(REGION, moto_url)
    assert CLIENT_CONFIG.retries["mode"] == "adaptive"
    assert client.meta.config.retries["mode"] == "adaptive"
    assert client.meta.config.retries["total_max_attempts"] == 11  # the first try plus 10 retries


def test_no_region_is_a_usage_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_REGION", raising=False)
    monkeypatch.delenv("AWS_DEFAULT_REGION", raising=False)
    with pytest.raises(UsageError, match="no AWS region: pass --region or set AWS_REGION"):
        make_client(None, None)


def test_the_installed_botocore_knows_durability(moto_url: str) -> None:
    from durablecache.providers.aws import require_durability_api

    client = make_client(REGION, moto_url)
    require_durability_api(client)  # raises UsageError on a botocore without the parameter
    members = client.meta.service_model.operation_model("ModifyReplicationGroup").input_shape.members
    assert "Durability" in members
