"""The dual-write RESP proxy (see docs/proxy.md): forwards clients to the authoritative side and
reports every key a write touched, after the write was applied: in-process before the client sees the
reply, to a remote syncer streamed, with FREEZE waiting for its acknowledgement."""

from .marks import MarkCallback, MarkServer, RemoteMarks
from .router import Router
from .server import Proxy

__all__ = ["MarkCallback", "MarkServer", "Proxy", "RemoteMarks", "Router"]
