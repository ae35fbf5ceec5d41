"""deploy/iam-policy.json allows exactly the ElastiCache calls the provider makes.

Two checks: (1) every operation recorded (botocore ``provide-client-params`` hook) over a full
lifecycle is in the policy, and the policy has no action the provider never needs; (2) moto's own IAM
enforcement runs the same lifecycle with credentials that hold only this policy, and a policy
missing one action gives a clear, non-retrying access-denied error.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from awstest import REGION, FakeClock, Recorder, unique

from durablecache.errors import ConnectError
from durablecache.providers.aws import AwsProvider, make_client
from durablecache.providers.awserrors import AwsAccessDenied
from durablecache.providers.base import TargetSpec

POLICY_FILE = Path(__file__).parents[2] / "deploy" / "iam-policy.json"
# Permissions AWS checks for a call we make, without us calling that operation ourselves.
IMPLIED = {"elasticache:AddTagsToResource": "CreateReplicationGroup and CreateSnapshot pass Tags",
           "elasticache:Connect": "the worker's AUTH with an IAM token (iamauth.py) on source and target"}
MIGRATION = "shop/sessions"
TOKEN = "a-valid-token-0123456789"


def policy_actions() -> set[str]:
    doc = json.loads(POLICY_FILE.read_text())
    actions: set[str] = set()
    for statement in doc["Statement"]:
        assert statement["Effect"] == "Allow"
        listed = statement["Action"]
        actions.update([listed] if isinstance(listed, str) else listed)
    return actions


def lifecycle(provider: AwsProvider, publish_lag: Callable[[str], None] | None = None) -> None:
    """Every provider call the migration protocol makes, in protocol order. ``publish_lag(target)``
    puts a DurabilityLag datapoint for the target's nodes into CloudWatch, so that the reader fetches it."""
    spec = TargetSpec(replication_group_id=unique("tgt"), migration_id=MIGRATION, durability="sync",
                      auth_token=TOKEN)
    assert provider.preflight(spec).ok
    snapshot = provider.snapshot_source(unique("seed"), MIGRATION, route_in_active=True)
    seeded = TargetSpec(**{**spec.__dict__, "seed_snapshot": snapshot})
    provider.ensure_target(seeded)
    provider.wait_ready(seeded)
    provider.endpoints(seeded)
    if publish_lag is not None:
        publish_lag(seeded.replication_group_id)
    provider.durability_lag_reader(seeded)()
    provider.set_durability(TargetSpec(**{**spec.__dict__, "durability": "async"}))
    provider.delete_target(seeded, "Delete", reached_flip=False)
    provider.delete_source("SnapshotThenDelete", MIGRATION, migration_completed=True)


def test_policy_matches_the_calls_the_provider_makes(
        make_source: Callable[..., str], make_provider: Callable[..., AwsProvider], recorder: Recorder,
        moto_url: str) -> None:
    admin = make_client(REGION, moto_url)
    cloudwatch = boto3.client("cloudwatch", region_name=REGION, endpoint_url=moto_url)

    def publish_lag(target: str) -> None:
        (rg,) = admin.describe_replication_groups(ReplicationGroupId=target)["ReplicationGroups"]
        cloudwatch.put_metric_data(Namespace="AWS/ElastiCache", MetricData=[
            {"MetricName": "DurabilityLag", "Value": 120.0, "Unit": "Milliseconds",
             "Dimensions": [{"Name": "CacheClusterId", "Value": rg["MemberClusters"][0]},
                            {"Name": "CacheNodeId", "Value": "0001"}]}])

    lifecycle(make_provider(make_source(auth_token=TOKEN)), publish_lag)
    called = recorder.actions()
    allowed = policy_actions()
    assert called <= allowed, f"the policy lacks {sorted(called - allowed)}"
    assert allowed - called == set(IMPLIED), f"the policy allows calls never made: {sorted(allowed - called)}"
    assert all("Tags" in recorder.params(op)[0] for op in ("CreateReplicationGroup", "CreateSnapshot"))


@pytest.fixture
def iam_enforced(moto_url: str) -> Iterator[Callable[[set[str]], boto3.session.Session]]:
    """Make IAM users holding a given set of actions, then switch moto's IAM enforcement on."""
    iam = boto3.client("iam", region_name=REGION, endpoint_url=moto_url)

    def user_with(actions: set[str]) -> boto3.session.Session:
        doc = json.loads(POLICY_FILE.read_text())
        for statement in doc["Statement"]:
            # moto names CloudWatch's actions by its endpoint prefix (monitoring:), AWS by cloudwatch:.
            statement["Action"] = [a.replace("cloudwatch:", "monitoring:") for a in statement["Action"]
                                   if a in actions]
        doc["Statement"] = [s for s in doc["Statement"] if s["Action"]]
        name = unique("dcache")
        iam.create_user(UserName=name)
        arn = iam.create_policy(PolicyName=name, PolicyDocument=json.dumps(doc))["Policy"]["Arn"]
        iam.attach_user_policy(UserName=name, PolicyArn=arn)
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return boto3.session.Session(aws_access_key_id=key["AccessKeyId"],
                                     aws_secret_access_key=key["SecretAccessKey"], region_name=REGION)

    try:
        yield user_with
    finally:
        set_auth(moto_url, "inf")  # back to moto's default: no authentication


def set_auth(moto_url: str, count: str) -> None:
    """moto's switch: after ``count`` more requests, every request must be signed by a known IAM user
    and be allowed by that user's policies."""
    req = urllib.request.Request(f"{moto_url}/moto-api/reset-auth", data=count.encode(), method="POST",
                                 headers={"Content-Type": "text/plain"})
    with urllib.request.urlopen(req, timeout=10):
        pass


def test_the_policy_is_enough_under_iam_enforcement(
        moto_url: str, make_source: Callable[..., str], iam_enforced: Callable[[set[str]], Any],
        clock: FakeClock) -> None:
    src, src2 = make_source(auth_token=TOKEN), make_source(auth_token=TOKEN)
    allowed = iam_enforced(policy_actions())
    limited = iam_enforced(policy_actions() - {"elasticache:CreateReplicationGroup"})
    set_auth(moto_url, "0")

    def provider(session: Any, source: str) -> AwsProvider:
        return AwsProvider(source, client=make_client(REGION, moto_url, session=session), clock=clock,
                           sleep=clock.sleep,
                           cloudwatch=session.client("cloudwatch", region_name=REGION, endpoint_url=moto_url))

    lifecycle(provider(allowed, src))
    with pytest.raises(AwsAccessDenied) as exc:
        provider(limited, src2).ensure_target(
            TargetSpec(replication_group_id=unique("tgt"), migration_id=MIGRATION, durability="sync",
                       auth_token=TOKEN))
    message = str(exc.value)
    assert message.startswith("AWS CreateReplicationGroup failed: AccessDenied: ")
    assert "elasticache:CreateReplicationGroup" in message and "deploy/iam-policy.json" in message
    assert isinstance(exc.value, ConnectError) and not exc.value.retryable
    assert TOKEN not in message


def test_connect_is_allowed_on_both_sides_and_the_user_only() -> None:
    """ElastiCache checks elasticache:Connect against the cache and the user (docs/aws.md): the
    statement names the source, the target and the IAM user, nothing wider."""
    doc = json.loads(POLICY_FILE.read_text())
    (statement,) = [s for s in doc["Statement"] if "elasticache:Connect" in s["Action"]]
    assert statement["Action"] == ["elasticache:Connect"]
    kinds = sorted(arn.split(":")[5] for arn in statement["Resource"])
    assert kinds == ["replicationgroup", "replicationgroup", "user"]
    assert not any(arn.endswith((":*", ":replicationgroup:*")) for arn in statement["Resource"])

