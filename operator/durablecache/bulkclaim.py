"""The keys the bulk copy's own batches are copying, for the syncer (Syncer.copy_now, syncer.py): in
flight like a worker's batch, but held a batch at a time rather than as a (db, key) entry per key."""

from __future__ import annotations

_NONE: set[bytes] = set()   # release()'s "none marked" (never filled)


class Held:
    """The keys of one db that the bulk copy's own batches are copying (Syncer.copy_now): in flight,
    claimed a batch at a time. Each batch is a set of its keys, built once; claiming and releasing it
    are set operations on the hashes stored there, with no Python loop and no (db, key) tuple per key.
    A key is in at most one batch: one copy of a key at a time."""

    __slots__ = ("keys", "batches", "marked")

    def __init__(self) -> None:
        self.keys: set[bytes] = set()         # of all batches in flight
        self.batches: list[set[bytes]] = []   # each batch's keys (to rebuild ``keys`` after a refused claim)
        self.marked: set[bytes] = set()       # held keys marked meanwhile: waiting in the syncer's _again

    def claim(self, batch: set[bytes]) -> bool:
        """Hold these keys; False (and nothing held) when one of them is held already."""
        before = len(self.keys)
        self.keys |= batch
        if len(self.keys) - before == len(batch):
            self.batches.append(batch)
            return True
        self.rebuild()
        return False

    def unclaim(self, batch: set[bytes]) -> None:
        """Undo the last claim (Syncer._workers_hold found a key of it taken)."""
        self.batches.pop()
        self.keys -= batch

    def rebuild(self) -> None:
        self.keys = set().union(*self.batches)

    def release(self, batch: set[bytes]) -> set[bytes]:
        """The batch's copy ended: its keys are no longer held. Returns those marked meanwhile."""
        self.keys -= batch
        for i, listed in enumerate(self.batches):
            if listed is batch:      # by identity: list.remove would compare sets by value
                del self.batches[i]
                break
        if not self.marked:
            return _NONE
        marked = self.marked & batch
        self.marked -= marked
        return marked
