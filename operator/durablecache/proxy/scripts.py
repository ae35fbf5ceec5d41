"""A conservative static check of Lua scripts and function libraries (EVAL, SCRIPT LOAD, FUNCTION LOAD)
during a migration: may the script run commands whose effect the proxy cannot follow key by key?

A script passes when every ``redis.call`` / ``redis.pcall`` / ``server.call`` / ``server.pcall`` has a
plain string literal as its first argument and that literal names no refused command (``flushall``,
``flushdb``, ``swapdb``, ``move``, ``select``, and ``copy`` unless it is plainly ``copy k1 k2
[replace]``). Anything that could reach those functions another way — ``redis`` or ``server`` used
other than as ``redis.<name>``, ``redis[...]``, ``_G``, ``getfenv``/``setfenv``, ``loadstring``/``load``,
``rawget`` … — makes the script *opaque*, and it is refused too. Comments and the contents of strings
are skipped by a small Lua tokenizer; a string literal with an escape (``'\\102lushdb'``) as the command
name is opaque (its value is not decoded).

Not on the hot path (one check per distinct script body; EVALSHA of a checked body is a set lookup), so
this module is not compiled.
"""

from __future__ import annotations

import hashlib
import re

REFUSED_IN_SCRIPTS = frozenset({"flushall", "flushdb", "swapdb", "move", "select"})
# Names that give a script another way to the redis/server table or to code the check did not see.
OPAQUE_NAMES = frozenset({"_G", "_ENV", "getfenv", "setfenv", "loadstring", "load", "dofile", "loadfile",
                          "rawget", "rawset", "rawequal", "require", "setmetatable", "getmetatable",
                          "debug", "module"})
CALLS = frozenset({"call", "pcall"})
TABLES = frozenset({"redis", "server"})

_NAME = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")
_NUMBER = re.compile(r"0[xX][0-9A-Fa-f]+|(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")
_LONG_OPEN = re.compile(r"\[(=*)\[")
_OPS = ("...", "..", "==", "~=", "<=", ">=", "::", "//", ">>", "<<")


class Opaque(ValueError):
    """The script cannot be checked (or does what is refused); the message says why."""


def sha1(body: bytes) -> str:
    return hashlib.sha1(body).hexdigest()


def tokens(src: str) -> list[tuple[str, str]]:
    """Lua tokens as (kind, text): kind is 'name', 'str' (text: the raw literal, quotes included),
    'num' or 'op'. Comments and whitespace are dropped."""
    out: list[tuple[str, str]] = []
    i, n = 0, len(src)
    while i < n:
        c = src[i]
        if c in " \t\r\n\f\v":
            i += 1
        elif src.startswith("--", i):
            m = _LONG_OPEN.match(src, i + 2)
            if m:
                end = src.find("]" + m.group(1) + "]", m.end())
                if end < 0:
                    raise Opaque("an unterminated comment")
                i = end + len(m.group(1)) + 2
            else:
                nl = src.find("\n", i)
                i = n if nl < 0 else nl + 1
        elif c == "[" and _LONG_OPEN.match(src, i):
            m = _LONG_OPEN.match(src, i)
            assert m is not None
            close = "]" + m.group(1) + "]"
            end = src.find(close, m.end())
            if end < 0:
                raise Opaque("an unterminated string")
            out.append(("str", src[i:end + len(close)]))
            i = end + len(close)
        elif c in "'\"":
            j = i + 1
            while j < n and src[j] != c:
                if src[j] == "\\":
                    j += 1
                elif src[j] == "\n":
                    raise Opaque("an unterminated string")
                j += 1
            if j >= n:
                raise Opaque("an unterminated string")
            out.append(("str", src[i:j + 1]))
            i = j + 1
        elif c.isalpha() or c == "_":
            m = _NAME.match(src, i)
            assert m is not None
            out.append(("name", m.group()))
            i = m.end()
        elif c.isdigit() or (c == "." and i + 1 < n and src[i + 1].isdigit()):
            m = _NUMBER.match(src, i)
            assert m is not None
            out.append(("num", m.group()))
            i = max(m.end(), i + 1)
        else:
            for op in _OPS:
                if src.startswith(op, i):
                    out.append(("op", op))
                    i += len(op)
                    break
            else:
                out.append(("op", c))
                i += 1
    return out


def literal(text: str) -> str | None:
    """The value of a string literal token; None if it has escapes (not decoded: opaque)."""
    if text[0] in "'\"":
        body = text[1:-1]
        return None if "\\" in body else body
    m = _LONG_OPEN.match(text)
    assert m is not None
    body = text[m.end():len(text) - len(m.group(1)) - 2]
    return body[1:] if body.startswith("\n") else body


def _arguments(toks: list[tuple[str, str]], start: int) -> tuple[list[list[tuple[str, str]]], int]:
    """The comma-separated arguments of the call whose '(' is at ``start``; and the index after ')'."""
    args: list[list[tuple[str, str]]] = [[]]
    depth = 0
    i = start + 1
    while i < len(toks):
        kind, text = toks[i]
        if kind == "op" and text in "([{":
            depth += 1
        elif kind == "op" and text in ")]}":
            if depth == 0:
                if text != ")":
                    break
                return ([] if args == [[]] else args), i + 1
            depth -= 1
        elif kind == "op" and text == "," and depth == 0:
            args.append([])
            i += 1
            continue
        args[-1].append(toks[i])
        i += 1
    raise Opaque("unbalanced brackets")


def _check_tokens(toks: list[tuple[str, str]]) -> None:
    for i, (kind, text) in enumerate(toks):
        if kind != "name":
            continue
        prev = toks[i - 1] if i else ("op", "")
        if prev in (("op", "."), ("op", ":")) and text not in TABLES:
            continue        # a field name (t.load, redis.call's "call"): only redis/server matter here
        if text in OPAQUE_NAMES:
            raise Opaque(f"it uses '{text}'")
        if text not in TABLES:
            continue
        if i + 2 >= len(toks) or toks[i + 1] != ("op", ".") or toks[i + 2][0] != "name":
            raise Opaque(f"it uses '{text}' other than as {text}.<function>(...)")
        field = toks[i + 2][1]
        if field not in CALLS:
            continue                    # redis.log, redis.sha1hex, redis.register_function ...
        if i + 3 >= len(toks) or toks[i + 3] != ("op", "("):
            raise Opaque(f"it uses {text}.{field} other than by calling it")
        args, _ = _arguments(toks, i + 3)
        if not args or len(args[0]) != 1 or args[0][0][0] != "str":
            raise Opaque(f"a {text}.{field} has no plain string literal as its command")
        name = literal(args[0][0][1])
        if name is None:
            raise Opaque(f"a {text}.{field} has a command name with escapes")
        name = name.lower()
        if name in REFUSED_IN_SCRIPTS:
            raise Opaque(f"it calls {name.upper()}, which is refused during a migration")
        if name == "copy":
            rest = args[1:]
            plain = len(rest) in (2, 3) and all(len(a) >= 1 for a in rest[:2])
            if len(rest) == 3:
                last = rest[2]
                value = literal(last[0][1]) if len(last) == 1 and last[0][0] == "str" else None
                plain = plain and value is not None and value.lower() == "replace"
            if not plain:
                raise Opaque("it calls COPY with arguments other than two keys and REPLACE "
                             "(COPY ... DB is refused during a migration)")


def check_script(body: bytes) -> str | None:
    """None if the script passes; otherwise why it is refused during a migration."""
    src = body.decode("latin-1")
    if src.startswith("#!"):          # EVAL's shebang line (#!lua flags=...)
        nl = src.find("\n")
        src = "" if nl < 0 else src[nl + 1:]
    try:
        _check_tokens(tokens(src))
    except Opaque as exc:
        return str(exc)
    return None


def check_library(body: bytes) -> tuple[str | None, list[bytes]]:
    """A FUNCTION LOAD library (its ``#!lua ...`` line allowed): why it is refused (None if it passes),
    and the names of the functions it registers that the check could read."""
    src = body.decode("latin-1")
    if src.startswith("#!"):
        nl = src.find("\n")
        src = "" if nl < 0 else src[nl + 1:]
    try:
        toks = tokens(src)
        _check_tokens(toks)
    except Opaque as exc:
        return str(exc), []
    names: list[bytes] = []
    for i in range(len(toks) - 3):
        if (toks[i][1] in TABLES and toks[i + 1] == ("op", ".")
                and toks[i + 2] == ("name", "register_function")):
            j = i + 3
            if toks[j] == ("op", "(") and j + 1 < len(toks):
                j += 1
            if toks[j][0] == "str":
                name = literal(toks[j][1])
                if name is not None:
                    names.append(name.encode("latin-1"))
            elif toks[j] == ("op", "{"):
                for k in range(j + 1, len(toks) - 2):
                    if toks[k] == ("op", "}"):
                        break
                    if toks[k] == ("name", "function_name") and toks[k + 1] == ("op", "=") \
                            and toks[k + 2][0] == "str":
                        name = literal(toks[k + 2][1])
                        if name is not None:
                            names.append(name.encode("latin-1"))
                        break
    return None, names
