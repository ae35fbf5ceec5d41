"""What a verify-and-repair would do to the side it writes, and whether to do it without asking.

A repair copies every differing key from the authoritative side to the other. That is right when the
other side drifted; it is a disaster when the *authoritative* side lost its data (a non-durable
server restarted empty): the repair would then copy the loss over the better copy. So before a repair
writes anything, its differences are sorted into what it would add, delete and overwrite on the side
it writes; deleting or overwriting more than a small share of that side stops and asks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

DirtyKey = tuple[int, bytes]


@dataclasses.dataclass
class RepairPlan:
    pending: Callable[[DirtyKey], bool] = lambda _dk: False    # the syncer's: is this key being copied?
    adds: list[DirtyKey] = dataclasses.field(default_factory=list)        # missing on the written side
    deletes: list[DirtyKey] = dataclasses.field(default_factory=list)     # on the written side only
    overwrites: list[DirtyKey] = dataclasses.field(default_factory=list)  # type, value or expiry differs
    live: int = 0     # differing keys the syncer had pending anyway (being written now): not counted

    def record(self, kind: str, db: int, key: bytes) -> None:
        """The Verifier's on_diff."""
        dk = (db, key)
        if self.pending(dk):
            self.live += 1
            return
        if kind == "missing":
            self.adds.append(dk)
        elif kind == "extra":
            self.deletes.append(dk)
        else:
            self.overwrites.append(dk)

    @property
    def destructive(self) -> int:
        return len(self.deletes) + len(self.overwrites)

    def to_copy(self) -> list[DirtyKey]:
        """Every key to copy again (a deletion is a copy of the key's absence)."""
        return self.adds + self.overwrites + self.deletes

    def too_destructive(self, written_keys: int, max_share: float, min_keys: int) -> bool:
        return self.destructive > max(min_keys, max_share * written_keys)

    def summary(self) -> dict[str, int]:
        return {"add": len(self.adds), "delete": len(self.deletes), "overwrite": len(self.overwrites),
                "live": self.live}
