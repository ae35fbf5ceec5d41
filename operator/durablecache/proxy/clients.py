"""CLIENT LIST and CLIENT KILL through the proxy: the client sees itself, never DurableCache's own.

Upstream, a client of the proxy is the session's connection, named ``<prefix>-<session id>`` so that
DurableCache can tell its connections from everyone else's (the RouteIn gate, the watch for direct
writers). Through the proxy, CLIENT LIST shows those connections under the names the clients gave
themselves (CLIENT SETNAME), hides DurableCache's other connections (syncer, copier, watch, admin),
and shows everyone else as the server does. CLIENT KILL picks its victims from that same view and
kills them one by one by ID, so no filter — ``TYPE normal SKIPME yes`` included — can reach a
connection DurableCache needs.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

OWN_PREFIX = b"durablecache-"
Fields = list[tuple[bytes, bytes]]
# The filters of the new CLIENT KILL form this proxy evaluates; others are refused by name.
KILL_FILTERS = frozenset({b"id", b"type", b"user", b"addr", b"laddr", b"skipme", b"maxage"})
_TYPES = {b"normal", b"master", b"slave", b"replica", b"pubsub"}


class KillError(ValueError):
    """A CLIENT KILL the proxy answers with an error (its text is the reply, without the dash)."""


def parse_line(line: bytes) -> Fields:
    """One CLIENT LIST line, fields in order (values may be empty; ``name=`` is)."""
    out: Fields = []
    for part in line.split(b" "):
        k, sep, v = part.partition(b"=")
        if sep:
            out.append((k, v))
    return out


def field(fields: Fields, key: bytes) -> bytes:
    return next((v for k, v in fields if k == key), b"")


def view(text: bytes, client_name: Callable[[bytes], bytes | None | bool],
         sessions_seen: set[bytes] | None = None) -> list[Fields]:
    """The clients a client of the proxy sees in ``text`` (an upstream's CLIENT LIST).

    ``client_name(upstream name)`` says what a DurableCache connection is: the name its client set
    (bytes, or None when it set none) for a session's connection, False for DurableCache's own.
    ``sessions_seen``: across the lists of several nodes, a session (one client connection, one
    upstream connection per node) is shown once, at its first node.
    """
    seen: list[Fields] = []
    for line in text.splitlines():
        fields = parse_line(line)
        if not fields:
            continue
        name = field(fields, b"name")
        if name.startswith(OWN_PREFIX):
            shown = client_name(name)
            if shown is False:
                continue
            if sessions_seen is not None:
                if name in sessions_seen:
                    continue
                sessions_seen.add(name)
            fields = [(k, (shown or b"") if k == b"name" else v) for k, v in fields]   # type: ignore[misc]
        seen.append(fields)
    return seen


def render(clients: Sequence[Fields]) -> bytes:
    return b"".join(b" ".join(b"%s=%s" % kv for kv in c) + b"\n" for c in clients)


def _client_type(fields: Fields) -> bytes:
    flags = field(fields, b"flags")
    if b"M" in flags:
        return b"master"
    if b"S" in flags:
        return b"replica"
    if b"P" in flags:
        return b"pubsub"
    return b"normal"


def kill_victims(args: Sequence[bytes], clients: Sequence[Fields], me: Collection[bytes]) -> tuple[list[bytes], bool]:
    """The IDs a CLIENT KILL (``args`` after KILL) selects among ``clients``; and whether it is the
    old form (``CLIENT KILL addr``: +OK or "No such client" rather than a count). ``me``: the IDs of
    the calling session's own connections, skipped unless SKIPME no."""
    if len(args) == 1:      # no match: "No such client", once no node of the proxy's has it
        return [field(c, b"id") for c in clients if field(c, b"addr") == args[0]], True
    if len(args) % 2:
        raise KillError("ERR syntax error")
    tests: list[Callable[[Fields], bool]] = []
    skipme = True
    for i in range(0, len(args), 2):
        key, value = args[i].lower(), args[i + 1]
        if key not in KILL_FILTERS:
            raise KillError(f"ERR durablecache: CLIENT KILL {key.decode(errors='replace').upper()} is not "
                            "supported through the proxy; see docs/limits.md")
        if key == b"skipme":
            if value.lower() not in (b"yes", b"no"):
                raise KillError("ERR syntax error")
            skipme = value.lower() == b"yes"
        else:
            tests.append(_filter(key, value))
    victims = [field(c, b"id") for c in clients
               if all(t(c) for t in tests) and not (skipme and field(c, b"id") in me)]
    return victims, False


def _filter(key: bytes, value: bytes) -> Callable[[Fields], bool]:
    if key == b"id":
        if not value.isdigit():
            raise KillError("ERR client-id should be greater than 0")
        return lambda c: field(c, b"id") == value
    if key == b"type":
        wanted = value.lower()
        if wanted not in _TYPES:
            raise KillError(f"ERR Unknown client type '{value.decode(errors='replace')}'")
        wanted = b"replica" if wanted == b"slave" else wanted
        return lambda c: _client_type(c) == wanted
    if key == b"maxage":
        if not value.isdigit():
            raise KillError("ERR value is not an integer or out of range")
        age = int(value)
        return lambda c: int(field(c, b"age") or 0) > age   # as the server: older than maxage
    name = b"user" if key == b"user" else key
    return lambda c: field(c, name) == value
