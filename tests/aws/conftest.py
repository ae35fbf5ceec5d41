"""ElastiCache tests against moto in server mode (a real HTTP endpoint on a free loopback port).

The server is ``tests/aws/motoserver.py``: moto plus the few ElastiCache behaviours the provider
depends on (durability read-back, creating->available, deletion), each documented there. Every
provider built here records what it sends through botocore's own event hooks, so tests assert the
parameters that really went over the wire, not what moto chose to keep.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from awstest import REGION, FakeClock, Recorder, unique

from durablecache.ports import free_port
from durablecache.providers.aws import AwsProvider, make_client
from durablecache.testing.localvalkey import stop_process
from durablecache.testing.waiting import wait_answering

MOTO_SERVER = Path(__file__).with_name("motoserver.py")
START_TIMEOUT = 30.0
FAKE_CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
}
# Never let a developer's real profile or config reach the tests.
CLEARED = ("AWS_PROFILE", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_ENDPOINT_URL",
           "AWS_ENDPOINT_URL_ELASTICACHE")


@pytest.fixture(scope="session", autouse=True)
def aws_env() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        for key in CLEARED:
            mp.delenv(key, raising=False)
        for key, value in FAKE_CREDENTIALS.items():
            mp.setenv(key, value)
        mp.setenv("AWS_CONFIG_FILE", os.devnull)
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", os.devnull)
        yield


@pytest.fixture(scope="session")
def moto_url(aws_env: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = (tmp_path_factory.mktemp("moto") / "moto.log").open("wb")
    env = {**os.environ, "DC_MOTO_POLLS": "1"}
    proc = subprocess.Popen([sys.executable, str(MOTO_SERVER), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_answering(f"{url}/moto-api/data.json", proc, START_TIMEOUT, describe=lambda: f"see {log.name}")
        yield url
    finally:
        stop_process(proc)
        log.close()


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def admin(moto_url: str) -> Any:
    """A plain client for test setup (not recorded, not the provider's)."""
    return make_client(REGION, moto_url)


@pytest.fixture
def make_provider(moto_url: str, recorder: Recorder, clock: FakeClock) -> Callable[..., AwsProvider]:
    def make(source_id: str, **kwargs: Any) -> AwsProvider:
        client = recorder.attach(make_client(REGION, moto_url))
        kwargs.setdefault("clock", clock)
        kwargs.setdefault("sleep", clock.sleep)
        # Never the real CloudWatch: moto's, recorded like the ElastiCache calls.
        kwargs.setdefault("cloudwatch", recorder.attach(
            boto3.client("cloudwatch", region_name=REGION, endpoint_url=moto_url), "cloudwatch"))
        return AwsProvider(source_id, client=client, **kwargs)

    return make


@pytest.fixture
def make_source(admin: Any) -> Callable[..., str]:
    """A source replication group as ElastiCache would show it, including its member cache clusters
    (engine version, subnet group, security groups and parameter group live on those)."""

    def make(
        *,
        engine: str = "redis",
        engine_version: str = "7.1",
        node_type: str = "cache.r6g.large",
        shards: int = 2,
        replicas: int = 1,
        cluster_mode: bool = True,
        auth_token: str | None = None,
        tls: bool = True,
        tags: dict[str, str] | None = None,
        kms_key_id: str | None = None,
    ) -> str:
        rg_id = unique("src")
        subnet_group = f"{rg_id}-subnets"
        admin.create_cache_subnet_group(CacheSubnetGroupName=subnet_group, CacheSubnetGroupDescription="test",
                                      SubnetIds=["subnet-1111", "subnet-2222"])
        params: dict[str, Any] = dict(
            ReplicationGroupId=rg_id, ReplicationGroupDescription="source", Engine=engine,
            EngineVersion=engine_version, CacheNodeType=node_type,
            ClusterMode="enabled" if cluster_mode else "disabled",
            NumNodeGroups=shards, ReplicasPerNodeGroup=replicas, TransitEncryptionEnabled=tls,
            AtRestEncryptionEnabled=True, MultiAZEnabled=replicas > 0, AutomaticFailoverEnabled=replicas > 0,
            CacheSubnetGroupName=subnet_group, SecurityGroupIds=["sg-0aaa", "sg-0bbb"],
            PreferredMaintenanceWindow="sun:05:00-sun:06:00",
            Tags=[{"Key": k, "Value": v} for k, v in (tags or {"team": "shop", "env": "prod"}).items()],
        )
        if auth_token:
            params["AuthToken"] = auth_token
        if kms_key_id:
            params["KmsKeyId"] = kms_key_id
        rg = admin.create_replication_group(**params)["ReplicationGroup"]
        for member in rg["MemberClusters"]:
            admin.create_cache_cluster(
                CacheClusterId=member, ReplicationGroupId=rg_id, Engine=engine, EngineVersion=engine_version,
                CacheNodeType=node_type, CacheParameterGroupName=f"default.{engine}7.cluster.on",
                CacheSubnetGroupName=subnet_group, SecurityGroupIds=["sg-0aaa", "sg-0bbb"],
                PreferredMaintenanceWindow="sun:05:00-sun:06:00")
        # Let the source finish "creating" so it looks like a long-running production cluster.
        admin.describe_replication_groups(ReplicationGroupId=rg_id)
        admin.describe_replication_groups(ReplicationGroupId=rg_id)
        return rg_id

    return make
