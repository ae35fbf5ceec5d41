"""The proxy's core promise, checked reply by reply: a write's reply reaches the client only after its
key was marked. Raw pipelined bytes, split at awkward places, in large batches."""

from __future__ import annotations

import socket

import libvalkey
import pytest

from durablecache.resp import pack


def read_replies(sock: socket.socket, n: int, on_reply) -> None:  # type: ignore[no-untyped-def]
    reader = libvalkey.Reader()
    got = 0
    while got < n:
        data = sock.recv(1 << 16)
        assert data, "proxy closed the connection"
        reader.feed(data)
        while (reply := reader.gets()) is not False:
            on_reply(got, reply)
            got += 1


@pytest.mark.parametrize("mark_delay", [0.0, 0.002])
def test_every_write_reply_follows_its_mark(source, make_proxy, mark_delay):
    proxy = make_proxy(source.endpoint())
    proxy.mark_delay = mark_delay  # 0: marks delivered at once; >0: delivery has to be awaited
    commands = []
    for i in range(6000):
        commands.append(("SET", f"k{i}", i) if i % 3 else ("GET", f"k{i - 1}"))
    payload = pack(commands)
    sock = socket.create_connection(("127.0.0.1", proxy.port), timeout=30)
    try:
        # Split the stream in uneven pieces, including right after a `*3\r\n` header.
        cut = payload.index(b"*3\r\n", 1000) + 4
        pieces = [payload[:cut], payload[cut:cut + 7], payload[cut + 7:]]
        for piece in pieces:
            sock.sendall(piece)

        def check(i: int, reply: object) -> None:
            name, key = commands[i][0], commands[i][1]
            assert not isinstance(reply, libvalkey.ReplyError), reply
            if name == "SET":
                assert (0, key.encode()) in proxy.marks, f"reply to SET {key} arrived before its mark"

        read_replies(sock, len(commands), check)
    finally:
        sock.close()
    assert source.client().get("k5999") == b"5999"
    assert not any(k.startswith(b"k") and int(k[1:]) % 3 == 0 for _, k in proxy.marks), "GETs were marked"
