"""A client connection for the proxy tests that returns error replies as values (libvalkey.ReplyError)
instead of raising them, and keeps one connection: valkey-py drops its connection on some errors
(WRONGPASS), and its reconnect would be a new session."""

from __future__ import annotations

import socket

import libvalkey

from durablecache.resp import pack


class Raw:
    def __init__(self, port: int, protocol: int = 2):
        self.s = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.r = libvalkey.Reader()
        if protocol == 3:
            hello = self("HELLO", "3")
            assert isinstance(hello, (dict, list)), hello

    def pipe(self, *cmds: tuple[str | bytes | int, ...]) -> list[object]:
        self.s.sendall(pack([tuple(str(a).encode() if isinstance(a, int) else a for a in c) for c in cmds]))
        out: list[object] = []
        while len(out) < len(cmds):
            reply = self.r.gets()
            if reply is False:
                data = self.s.recv(65536)
                if not data:
                    raise EOFError
                self.r.feed(data)
                continue
            out.append(reply)
        return out

    def __call__(self, *args: str | bytes | int) -> object:
        return self.pipe(args)[0]

    def close(self) -> None:
        self.s.close()


def refused(reply: object, code: str) -> bool:
    return isinstance(reply, libvalkey.ReplyError) and str(reply).startswith(code)
