"""The queue of expected replies (session.Replies): strict order, and taken entries do not pile up."""

from __future__ import annotations

from durablecache.proxy.replies import COMPACT_AT, Entry, Replies


def test_entries_come_out_in_order_and_taken_ones_do_not_pile_up() -> None:
    q = Replies()
    entries = [Entry() for _ in range(20 * COMPACT_AT)]
    taken: list[Entry] = []
    for i, e in enumerate(entries):
        q.append(e)
        if i % 3:                       # two taken for every three queued: a backlog that keeps growing
            taken.append(q.popleft())
        assert len(q) == i + 1 - len(taken)
        # Entries already taken stay until there are COMPACT_AT of them and more than those waiting.
        assert q.head <= max(COMPACT_AT, len(q))
    assert q[0] is entries[len(taken)] and q[len(q) - 1] is entries[-1]
    assert taken + list(q) == entries
    while q:
        taken.append(q.popleft())
    assert taken == entries and not q.items and q.head == 0


def test_an_emptied_queue_starts_over_and_clear_forgets_everything() -> None:
    q = Replies()
    a, b, c = Entry(), Entry(), Entry()
    q.append(a)
    assert q.popleft() is a and not q and len(q) == 0 and q.items == []
    q.append(b)
    q.append(c)
    assert q and q[0] is b and list(q) == [b, c]
    assert q.popleft() is b and list(q) == [c]
    assert all(e is not b for e in q.items)     # a taken entry (its reply, keys) is not kept alive
    q.append(b)
    assert list(q) == [c, b]
    q.clear()
    assert not q and q.items == [] and q.head == 0
