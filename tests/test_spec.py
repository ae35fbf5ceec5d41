"""The DurableCache spec is parsed in one place (durablecache.k8s.spec), with the engine's defaults
(durablecache.options): the CRD's schema defaults must be the same values, every duration field takes
the one format the parser reads, and a bad field is refused with its path in the message."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from durablecache.commands import migrate as migrate_cmd
from durablecache.k8s.spec import AUTO_PROCESSES, DurableCacheSpec, SpecError
from durablecache.options import (
    DEFAULTS,
    GO_DURATION_PATTERN,
    OPERATOR_AFTER_CUTOVER,
    OPERATOR_CUTOVER,
    MigrationOptions,
    OptionError,
    parse_duration,
)

ROOT = Path(__file__).resolve().parents[1]
CRDS = [ROOT / "crds" / "durablecache.yaml", ROOT / "charts" / "durablecache-operator" / "files" / "durablecache.yaml"]

# Every schema default of spec, and where the parsed spec holds it. A default added to the CRD without
# a line here fails test_every_crd_default_is_the_parsers_default.
PARSED: dict[str, Callable[[DurableCacheSpec], Any]] = {
    "target.provider": lambda s: s.target.provider,
    "target.shards": lambda s: s.target.shards,
    "target.replicasPerShard": lambda s: s.target.replicas_per_shard,
    "seeding.mode": lambda s: s.seeding.mode,
    "routeIn.settlePeriod": lambda s: s.route_in.settle_period,
    "repair.maxDestructiveShare": lambda s: s.repair.max_destructive_share,
    "repair.acceptDestructive": lambda s: s.repair.accept_destructive,
    "cutover.mode": lambda s: s.cutover.mode,
    "cutover.approved": lambda s: s.cutover.approved,
    "cutover.maxWritePause": lambda s: s.cutover.max_write_pause,
    "cutover.maxKeyPause": lambda s: s.cutover.max_key_pause,
    "cutover.rollbackWindow": lambda s: s.cutover.rollback_window,
    "cutover.rollback": lambda s: s.cutover.rollback,
    "endpoint.afterCutover": lambda s: s.endpoint.after_cutover,
    "deletionPolicy.source": lambda s: s.deletion_policy.source,
    "deletionPolicy.target": lambda s: s.deletion_policy.target,
    "source.tls.caSecretRef.key": lambda s: s.source.tls.ca.key if s.source.tls.ca else None,
    "target.tls.caSecretRef.key": lambda s: s.target.tls.ca.key if s.target.tls.ca else None,
    "source.authSecretRef.key": lambda s: s.source.auth.key if s.source.auth else None,
    "target.authSecretRef.key": lambda s: s.target.auth.key if s.target.auth else None,
    "proxy.replicas": lambda s: s.proxy.replicas,
    "proxy.processes": lambda s: s.proxy.processes,
}
DURATION_FIELDS = {"routeIn.settlePeriod", "cutover.maxWritePause", "cutover.maxKeyPause", "cutover.rollbackWindow",
                   "cutover.drainBudget"}


def minimal(**spec: Any) -> dict[str, Any]:
    """The least the CRD accepts, with the secret references set so that their keys' defaults show."""
    base: dict[str, Any] = {
        "source": {"replicationGroupId": "sessions-prod", "authSecretRef": {"name": "old-auth"},
                   "tls": {"caSecretRef": {"name": "old-ca"}}},
        "target": {"replicationGroupId": "sessions-durable", "durability": "sync",
                   "authSecretRef": {"name": "new-auth"}, "tls": {"caSecretRef": {"name": "new-ca"}}},
        "endpoint": {"secretName": "sessions"},
    }
    for key, value in spec.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    return {"metadata": {"namespace": "shop", "name": "sessions", "generation": 3}, "spec": base}


def schema_properties(path: str, node: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    for name, prop in (node.get("properties") or {}).items():
        here = f"{path}.{name}" if path else name
        yield here, prop
        yield from schema_properties(here, prop)
        if prop.get("type") == "array":
            yield from schema_properties(f"{here}[]", prop.get("items") or {})


def spec_schema(crd: Path) -> dict[str, Any]:
    doc = yaml.safe_load(crd.read_text())
    return doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]["spec"]  # type: ignore[no-any-return]


@pytest.mark.parametrize("crd", CRDS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_crd_default_is_the_parsers_default(crd: Path) -> None:
    defaults = {path: prop["default"] for path, prop in schema_properties("", spec_schema(crd))
                if "default" in prop and prop["default"] != {}}
    assert set(defaults) == set(PARSED), "a CRD default without a parsed field to compare it with, or the reverse"
    parsed = DurableCacheSpec.parse(minimal())
    for path, crd_default in defaults.items():
        want = parse_duration(crd_default) if path in DURATION_FIELDS else crd_default
        assert PARSED[path](parsed) == want, f"{path}: CRD default {crd_default!r}, parser {PARSED[path](parsed)!r}"


@pytest.mark.parametrize("crd", CRDS, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_duration_field_has_the_one_format(crd: Path) -> None:
    props = dict(schema_properties("", spec_schema(crd)))
    assert {p for p, prop in props.items() if prop.get("pattern") == GO_DURATION_PATTERN} == DURATION_FIELDS
    for text, seconds in (("100ms", 0.1), ("1m30s", 90.0), ("2h", 7200.0), ("1.5s", 1.5), ("250us", 0.00025)):
        assert parse_duration(text) == pytest.approx(seconds)


def test_the_engine_gets_the_spec_s_settings() -> None:
    spec = DurableCacheSpec.parse(minimal(cutover={"mode": "auto", "maxWritePause": "250ms", "drainBudget": "200ms",
                                                   "maxKeyPause": "2s", "rollbackWindow": "1h"},
                                          routeIn={"settlePeriod": "1m", "allowedClients": ["monitor"]},
                                          repair={"maxDestructiveShare": 0.5, "acceptDestructive": True}))
    opts = spec.migration_options(gate_timeout=90.0)
    assert (opts.cutover, opts.max_write_pause, opts.drain_budget, opts.max_key_pause, opts.rollback_window) == \
        ("auto", 0.25, 0.2, 2.0, 3600.0)
    assert (opts.gate_settle, opts.allow_clients, opts.gate_timeout) == (60.0, ["monitor"], 90.0)
    assert (opts.repair_max_share, opts.accept_destructive_repair) == (0.5, True)


def test_the_cli_and_the_spec_share_the_engine_s_defaults() -> None:
    """Only the cutover mode and what follows the end differ on purpose: the operator waits for approval
    (OPERATOR_CUTOVER) and moves the applications to the target (OPERATOR_AFTER_CUTOVER)."""
    parser = migrate_cmd.argparse.ArgumentParser()
    migrate_cmd.add_arguments(parser)
    args = parser.parse_args(["--source", "valkey://a:1", "--target", "valkey://b:2", "--listen", "127.0.0.1:0"])
    cli = migrate_cmd.options(args)
    spec = DurableCacheSpec.parse(minimal()).migration_options(gate_timeout=DEFAULTS.gate_timeout)
    assert cli == MigrationOptions()
    assert spec == MigrationOptions(cutover=OPERATOR_CUTOVER, after_cutover=OPERATOR_AFTER_CUTOVER)


BAD: list[tuple[str, dict[str, Any], str]] = [
    ("a duration that is not one", {"cutover": {"maxWritePause": "fast"}}, "spec.cutover.maxWritePause"),
    ("a write pause over the limit", {"cutover": {"maxWritePause": "31s"}}, "spec.cutover.maxWritePause"),
    ("a drain budget over the write pause", {"cutover": {"maxWritePause": "100ms", "drainBudget": "200ms"}},
     "spec.cutover.drainBudget"),
    ("an unknown cutover mode", {"cutover": {"mode": "later"}}, "spec.cutover.mode"),
    ("a share that is a string", {"repair": {"maxDestructiveShare": "lots"}}, "spec.repair.maxDestructiveShare"),
    ("a share over 1", {"repair": {"maxDestructiveShare": 2}}, "spec.repair.maxDestructiveShare"),
    ("a boolean that is a string", {"cutover": {"approved": "yes"}}, "spec.cutover.approved"),
    ("an endpoint without a port", {"source": {"replicationGroupId": None, "endpoints": [{"host": "a"}]}},
     "spec.source.endpoints[0].port"),
    ("both kinds of source", {"source": {"endpoints": [{"host": "a", "port": 1}]}}, "spec.source"),
    ("a static target without endpoints", {"target": {"provider": "static"}}, "spec.target.endpoints"),
    ("no durability", {"target": {"durability": None}}, "spec.target.durability"),
    ("an endpoint with nothing to write", {"endpoint": {"secretName": None}}, "spec.endpoint"),
    ("an unknown afterCutover", {"endpoint": {"afterCutover": "both"}}, "spec.endpoint.afterCutover"),
    ("a secret reference without a name", {"target": {"authSecretRef": {"key": "k"}}},
     "spec.target.authSecretRef.name"),
    ("more proxy pods than the bound", {"proxy": {"replicas": 65}}, "spec.proxy.replicas"),
    ("no proxy pod", {"proxy": {"replicas": 0}}, "spec.proxy.replicas"),
    ("no proxy process", {"proxy": {"processes": 0}}, "spec.proxy.processes"),
    ("proxy processes as a word", {"proxy": {"processes": "many"}}, "spec.proxy.processes"),
    ("proxy processes over the bound", {"proxy": {"processes": 65}}, "spec.proxy.processes"),
    ("a client limit of 0", {"proxy": {"maxClients": 0}}, "spec.proxy.maxClients"),
    ("a total client limit under one per process", {"proxy": {"replicas": 2, "processes": 2, "maxClientsTotal": 3}},
     "spec.proxy.maxClientsTotal"),
    ("a negative connection budget", {"proxy": {"connectionBudget": -1}}, "spec.proxy.connectionBudget"),
    ("a connection budget that is a string", {"proxy": {"connectionBudget": "10"}}, "spec.proxy.connectionBudget"),
    ("a client limit that is a string", {"proxy": {"maxClients": "100"}}, "spec.proxy.maxClients"),
    ("an announced host that is a number", {"proxy": {"announceHost": 7}}, "spec.proxy.announceHost"),
    ("a TLS secret that is not a name", {"proxy": {"tls": {"secretName": ["a"]}}}, "spec.proxy.tls.secretName"),
    ("a resource setting that is not one", {"proxy": {"resources": {"wants": {"cpu": 1}}}},
     "spec.proxy.resources.wants"),
    ("a quantity that is a boolean", {"proxy": {"resources": {"limits": {"cpu": True}}}},
     "spec.proxy.resources.limits.cpu"),
    ("a coordinator resource setting that is not one", {"coordinator": {"resources": {"wants": {"cpu": 1}}}},
     "spec.coordinator.resources.wants"),
    ("coordinator limits that are a list", {"coordinator": {"resources": {"limits": ["1"]}}},
     "spec.coordinator.resources.limits"),
]


@pytest.mark.parametrize(("why", "change", "field"), BAD, ids=[b[0] for b in BAD])
def test_a_bad_field_is_refused_by_its_path(why: str, change: dict[str, Any], field: str) -> None:
    obj = minimal()
    for part, values in change.items():
        for key, value in values.items():
            if value is None:
                obj["spec"][part].pop(key, None)
            else:
                obj["spec"].setdefault(part, {})[key] = copy.deepcopy(value)
    with pytest.raises(SpecError) as err:
        DurableCacheSpec.parse(obj)
    assert err.value.field == field, (why, str(err.value))
    assert str(err.value).startswith(field), str(err.value)


def test_the_cli_names_its_flag_for_the_same_checks() -> None:
    with pytest.raises(OptionError, match=r"--drain-budget"):
        MigrationOptions(max_write_pause=0.1, drain_budget=0.2)
    with pytest.raises(OptionError, match=r"--gate-settle"):
        MigrationOptions(gate_settle=-1)
    with pytest.raises(Exception, match="not a duration"):
        migrate_cmd.duration("soon")


def test_server_name_reaches_the_endpoint() -> None:
    spec = DurableCacheSpec.parse(minimal(target={"provider": "static", "replicationGroupId": None,
                                                  "endpoints": [{"host": "10.0.0.7", "port": 6380}],
                                                  "tls": {"enabled": True, "serverName": "cache.internal"}}))
    ep = spec.target.first_endpoint()
    assert (ep.host, ep.port, ep.tls, ep.server_name, ep.tls_hostname) == \
        ("10.0.0.7", 6380, True, "cache.internal", "cache.internal")


def test_spec_proxy_is_parsed_typed() -> None:
    spec = DurableCacheSpec.parse(minimal(proxy={
        "processes": "auto", "maxClients": 5000, "announceHost": "cache.shop.svc",
        "tls": {"secretName": "sessions-proxy-tls"},
        "resources": {"requests": {"cpu": "2", "memory": "512Mi"}, "limits": {"cpu": 2}}}))
    p = spec.proxy
    assert (p.replicas, p.processes, p.max_clients, p.announce_host, p.tls_secret_name) == \
        (2, AUTO_PROCESSES, 5000, "cache.shop.svc", "sessions-proxy-tls")
    assert p.resources == {"requests": {"cpu": "2", "memory": "512Mi"}, "limits": {"cpu": 2}}
    plain = DurableCacheSpec.parse(minimal()).proxy
    assert (plain.processes, plain.max_clients, plain.announce_host, plain.tls_secret_name, plain.resources) == \
        (1, None, None, None, {})


def test_spec_coordinator_resources_are_parsed() -> None:
    wanted = {"requests": {"cpu": "1", "memory": "1Gi"}, "limits": {"memory": "2Gi"}}
    assert DurableCacheSpec.parse(minimal(coordinator={"resources": wanted})).coordinator.resources == wanted
    assert DurableCacheSpec.parse(minimal()).coordinator.resources == {}


def test_several_proxy_pods_and_a_connection_budget_reach_the_engine() -> None:
    spec = DurableCacheSpec.parse(minimal(proxy={"replicas": 3, "connectionBudget": 5000}))
    assert (spec.proxy.replicas, spec.proxy.connection_budget) == (3, 5000)
    assert spec.migration_options().connection_budget == 5000
    # Unset: 0, the proxies' own default (90% of each server's maxclients), as for the CLI.
    assert DurableCacheSpec.parse(minimal()).proxy.connection_budget == DEFAULTS.connection_budget == 0
