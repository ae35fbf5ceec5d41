"""The commands a migration must refuse or check before they run: those whose effect cannot be
tracked key by key (FLUSHALL, SWAPDB, COPY ... DB ...), and scripts and functions, whose bodies are
checked (scripts.py) so that every key they write is one the proxy marks. See docs/proxy.md."""

from __future__ import annotations

from typing import Final

from . import framing, scripts
from .classify import UNSAFE
from .commandtable import CommandSpec
from .replies import Entry
from .session import Session
from .state import Handler

REFUSED: Final = ("ERR durablecache: {} is refused during a migration because its effect cannot be tracked "
                  "key by key; see docs/proxy.md")
SCRIPT_REFUSED: Final = ("ERR durablecache: this script is refused during a migration: {}; the proxy cannot "
                         "check it for writes it could not track key by key; see docs/proxy.md")
SCRIPTS_REMEMBERED: Final = 65536        # checked script SHA1s kept by the proxy (ProxyState.script_shas)
NOSCRIPT: Final = b"-NOSCRIPT No matching script. Please use EVAL.\r\n"


def _refuse_if_migrating(s: Session, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
    if s.proxy.migrating:
        if s.in_multi:
            s.multi_error = True
        s.local(framing.error(REFUSED.format(args[0].decode(errors="replace").upper())))
        return
    s.forward(args, spec)


def _copy(s: Session, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
    if s.proxy.migrating and any(a.lower() == b"db" for a in args[3:]):
        if s.in_multi:
            s.multi_error = True
        s.local(framing.error(REFUSED.format("COPY ... DB")))
        return
    s.forward(args, spec)


def _refuse_script(s: Session, reason: str) -> None:
    if s.in_multi:
        s.multi_error = True
    s.local(framing.error(SCRIPT_REFUSED.format(reason)))


def _accept_script(s: Session, body: bytes) -> bool:
    """Check a script body (once per distinct body: its SHA1 is remembered when it passes, for EVALSHA
    and the next EVAL of it); refuse it (False) if it does not pass."""
    sha = scripts.sha1(body).encode()
    shas = s.proxy.script_shas
    if sha in shas:
        return True
    reason = scripts.check_script(body)
    if reason is not None:
        _refuse_script(s, reason)
        return False
    if len(shas) >= SCRIPTS_REMEMBERED:   # bounded: clients that make up scripts as they go
        shas.clear()                      # (those forgotten get NOSCRIPT, and are sent again)
    shas.add(sha)
    return True


def _eval(s: Session, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
    """EVAL during a migration: the body is checked (scripts.check_script) and, if it passes, its
    SHA1 is remembered for EVALSHA. EVAL_RO cannot write: not checked."""
    if (s.proxy.migrating and len(args) > 1 and args[0].lower() == b"eval"
            and not _accept_script(s, args[1])):
        return
    s.forward(args, spec)


def _evalsha(s: Session, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
    """EVALSHA during a migration of a script the proxy has not checked: NOSCRIPT, so the client sends
    the body with EVAL (valkey-py's Script, GLIDE do), which is checked."""
    if (s.proxy.migrating and len(args) > 1 and args[0].lower() == b"evalsha"
            and args[1].lower() not in s.proxy.script_shas):
        if s.in_multi:
            s.multi_error = True
        s.local(NOSCRIPT)
        return
    s.forward(args, spec)


def _fcall(s: Session, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
    """FCALL during a migration: only of functions whose library the proxy checked and accepted (at
    FUNCTION LOAD through it, or in FUNCTION LIST WITHCODE at start). FCALL_RO cannot write."""
    if (s.proxy.migrating and len(args) > 1 and args[0].lower() == b"fcall"
            and args[1] not in s.proxy.functions):
        _refuse_script(s, f"function '{args[1].decode(errors='replace')}' is in a library the proxy did "
                          "not check (loaded other than through it during the migration)")
        return
    s.forward(args, spec)


def _script(s: Session, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
    sub = args[1].lower() if len(args) > 1 else b""
    if s.proxy.migrating and sub == b"load" and len(args) == 3:
        if not _accept_script(s, args[2]):
            return
    elif s.proxy.migrating and sub == b"exists" and len(args) > 2:
        # Scripts the proxy has not checked "do not exist": a client then loads them (SCRIPT LOAD,
        # checked) instead of sending an EVALSHA that would get NOSCRIPT (valkey-py's pipelines).
        shas = [a.lower() in s.proxy.script_shas for a in args[2:]]
        s.local_fn(lambda: framing.NOAUTH if not s.authed else
                   b"*%d\r\n" % len(shas) + b"".join(b":1\r\n" if ok else b":0\r\n" for ok in shas))
        return
    elif sub == b"flush":
        # The server forgets every script: so does the proxy (SCRIPT EXISTS above answers from it).
        def flushed(e: Entry) -> None:
            if (e.reply or b"").startswith(b"+"):
                s.proxy.script_shas.clear()
        s.forward(args, spec, flushed)
        return
    s.forward(args, spec)


def _function(s: Session, args: tuple[bytes, ...], spec: CommandSpec | None) -> None:
    sub = args[1].lower() if len(args) > 1 else b""
    if s.proxy.migrating and sub == b"load" and len(args) > 2:
        reason, names = scripts.check_library(args[-1])
        if reason is not None:
            _refuse_script(s, reason)
            return
        s.proxy.functions.update(names)
    elif s.proxy.migrating and sub == b"restore":
        _refuse_script(s, "FUNCTION RESTORE loads libraries the proxy cannot check")
        return
    s.forward(args, spec)



GUARDS: Final[dict[bytes, Handler[Session]]] = {
    **{name: _refuse_if_migrating for name in UNSAFE},
    b"copy": _copy,
    b"eval": _eval, b"eval_ro": _eval, b"evalsha": _evalsha, b"evalsha_ro": _evalsha,
    b"fcall": _fcall, b"fcall_ro": _fcall, b"script": _script, b"function": _function,
}
