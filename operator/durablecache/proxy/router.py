"""Where a session's commands go: one standalone server, or the primaries of a cluster by slot."""

from __future__ import annotations

import dataclasses

from valkey.crc import key_slot

from ..topology import Topology
from ..urls import Endpoint


@dataclasses.dataclass
class Router:
    """Where a session's commands go: one standalone server, or the primaries of a cluster by slot."""

    cluster: bool
    nodes: list[Endpoint]
    owner: list[int]          # slot -> index into nodes (cluster only)

    def slot_of(self, keys: list[bytes]) -> int:
        """The common slot of ``keys``; -1 when they span slots (CROSSSLOT)."""
        slot = key_slot(keys[0])
        for k in keys[1:]:
            if key_slot(k) != slot:
                return -1
        return slot

    def owner_of(self, key: bytes) -> int:
        return self.owner[key_slot(key)] if self.cluster else 0

    @classmethod
    def from_topology(cls, topo: Topology) -> Router:
        if not topo.cluster:
            return cls(False, [topo.seed], [])
        return cls(True, list(topo.primaries), list(topo.slot_owner))
