"""The user documentation stays true to the code.

- every manifest in docs/examples/ (and every complete DurableCache shown in a doc) is a DurableCache
  whose fields exist in the CRD's schema (tests/kube applies the examples to a real API server; this
  catches a typo'd field, which an API server would only prune or warn about);
- every relative link in docs/*.md and README.md points to an existing file, and to an existing heading
  when it names one; every repository path they quote as inline code (`tests/...`, `bench/...`) exists;
- every `durablecache <subcommand>` the docs show exists in the CLI, and every `--flag` they quote for a
  subcommand exists in that subcommand's --help.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from durablecache.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
EXAMPLES = sorted((DOCS / "examples").glob("*.yaml"))
CRD = ROOT / "crds" / "durablecache.yaml"


def doc_files() -> list[Path]:
    files = sorted(DOCS.glob("*.md"))
    readme = ROOT / "README.md"
    return [*files, readme] if readme.exists() else files


FENCE = re.compile(r"^(```|~~~)[^\n]*\n(.*?)^\1[ \t]*$", re.M | re.S)
# Inline code: one or more backticks, content without a blank line.
INLINE = re.compile(r"(`+)((?:(?!\n\s*\n).)+?)\1", re.S)


# -- examples -------------------------------------------------------------------------------------------
def crd_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    version = next(v for v in crd["spec"]["versions"] if v["storage"])
    return version["schema"]["openAPIV3Schema"]


def schema_problems(value: Any, schema: dict[str, Any], path: str) -> Iterator[str]:
    """Unknown fields, missing required fields, wrong types and values outside an enum."""
    kind = schema.get("type")
    if "enum" in schema and value not in schema["enum"]:
        yield f"{path}: {value!r} is not one of {schema['enum']}"
    if kind == "object":
        if not isinstance(value, dict):
            yield f"{path}: expected an object, got {value!r}"
            return
        for req in schema.get("required", []):
            if req not in value:
                yield f"{path}.{req}: required"
        props = schema.get("properties", {})
        for key, sub in value.items():
            if key in props:
                yield from schema_problems(sub, props[key], f"{path}.{key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                yield from schema_problems(sub, schema["additionalProperties"], f"{path}.{key}")
            elif not schema.get("x-kubernetes-preserve-unknown-fields") and path != ".metadata":
                yield f"{path}.{key}: unknown field"
    elif kind == "array":
        if not isinstance(value, list):
            yield f"{path}: expected a list, got {value!r}"
            return
        for i, item in enumerate(value):
            yield from schema_problems(item, schema.get("items", {}), f"{path}[{i}]")
    elif kind == "string" and not isinstance(value, str):
        yield f"{path}: expected a string, got {value!r}"
    elif kind == "integer" and (not isinstance(value, int) or isinstance(value, bool)):
        yield f"{path}: expected an integer, got {value!r}"
    elif kind == "boolean" and not isinstance(value, bool):
        yield f"{path}: expected a boolean, got {value!r}"


def assert_durablecache(doc: Any, where: str) -> None:
    assert isinstance(doc, dict), f"{where}: not a mapping"
    assert doc.get("apiVersion") == "durablecache.dev/v1alpha1", f"{where}: apiVersion {doc.get('apiVersion')!r}"
    assert doc.get("kind") == "DurableCache", f"{where}: kind {doc.get('kind')!r}"
    meta = doc.get("metadata") or {}
    assert meta.get("name") and meta.get("namespace"), f"{where}: metadata.name and metadata.namespace"
    problems = list(schema_problems(doc, crd_schema(), ""))
    assert not problems, f"{where}: " + "; ".join(problems)


def test_there_are_examples() -> None:
    names = {p.name for p in EXAMPLES}
    assert {"sessions-aws.yaml", "sessions-static.yaml"} <= names, names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_is_a_valid_durablecache(path: Path) -> None:
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path.name} is empty"
    for i, doc in enumerate(docs):
        assert_durablecache(doc, f"{path.name} document {i}")


def test_complete_manifests_shown_in_the_docs_are_valid() -> None:
    shown = 0
    for md in doc_files():
        for match in FENCE.finditer(md.read_text()):
            body = match.group(2)
            if "kind: DurableCache" not in body:
                continue
            for doc in yaml.safe_load_all(body):
                if isinstance(doc, dict) and doc.get("kind") == "DurableCache":
                    assert_durablecache(doc, f"{md.name}: manifest {doc.get('metadata', {}).get('name')}")
                    shown += 1
    assert shown >= 1, "the quick start shows at least one complete DurableCache"


def test_schema_check_catches_a_typo() -> None:
    """The checker above is not vacuous: a misspelt field, a bad enum and a missing field are found."""
    doc = yaml.safe_load(EXAMPLES[0].read_text())
    doc["spec"]["cutover"]["maxWritePuase"] = "1s"
    doc["spec"]["target"]["durability"] = "always"
    del doc["spec"]["endpoint"]
    problems = " ".join(schema_problems(doc, crd_schema(), ""))
    assert ".spec.cutover.maxWritePuase: unknown field" in problems
    assert ".spec.target.durability: 'always'" in problems
    assert ".spec.endpoint: required" in problems


# -- links ------------------------------------------------------------------------------------------------
LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def prose(text: str) -> str:
    """The text without code blocks and inline code (links there are not links)."""
    return INLINE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(md: Path) -> set[str]:
    text = FENCE.sub("", md.read_text())
    found: set[str] = set()
    for heading in re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, re.M):
        base = slug(heading)
        name, n = base, 1
        while name in found:  # GitHub numbers repeated headings
            name = f"{base}-{n}"
            n += 1
        found.add(name)
    found |= set(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", text))
    return found


def relative_links(md: Path) -> list[str]:
    return [t for t in LINK.findall(prose(md.read_text())) if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]


@pytest.mark.parametrize("md", doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(md: Path) -> None:
    broken = []
    for target in relative_links(md):
        path, _, anchor = target.partition("#")
        dest = (md.parent / path).resolve() if path else md
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{md.name}: " + ", ".join(broken)


def test_link_checker_sees_links() -> None:
    """Not vacuous: the index links every page, and a made-up link would be reported."""
    index = relative_links(DOCS / "README.md")
    for page in ("quickstart.md", "protocol.md", "durability.md", "runbook.md", "metrics.md", "limits.md",
                 "troubleshooting.md"):
        assert page in index, page
    assert "protocol.md#cutover-freeze-drain-flip-unfreeze" in relative_links(DOCS / "runbook.md")
    assert "cutover-freeze-drain-flip-unfreeze" in anchors(DOCS / "protocol.md")
    assert "no-such-heading" not in anchors(DOCS / "protocol.md")


# A path into the repository quoted as inline code: a top-level folder of it, then a file or folder name.
REPO_PATH = re.compile(r"^(?:\.\./)?((?:tests|operator|bench|docs|scripts|crds|charts|tools|deploy|\.ci)/[\w./-]+)")


def quoted_paths(md: Path) -> list[str]:
    """Repository paths in ``md``'s inline code, without a test id (::name) or an anchor."""
    found = []
    for _, code in INLINE.findall(FENCE.sub("", md.read_text())):
        if m := REPO_PATH.match(code.strip()):
            found.append(m.group(1).split("::")[0].split("#")[0].rstrip(".,:;"))
    return found


@pytest.mark.parametrize("md", doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_quoted_repository_paths_exist(md: Path) -> None:
    missing = [path for path in quoted_paths(md) if not (ROOT / path).exists()]
    assert not missing, f"{md.name} quotes paths that do not exist: {missing}"


def test_path_checker_sees_paths() -> None:
    """Not vacuous: the architecture page quotes the layer test and the CRD."""
    paths = quoted_paths(DOCS / "architecture.md")
    assert "tests/test_layers.py" in paths
    assert REPO_PATH.match("`bench/no-such.py`".strip("`")) and not (ROOT / "bench/no-such.py").exists()


# -- the CLI the docs show -------------------------------------------------------------------------------
def cli() -> tuple[dict[str, set[str]], set[str]]:
    """{subcommand: its --flags} and the global --flags, from the parser `durablecache --help` prints."""
    parser = build_parser()
    globals_ = {o for a in parser._actions for o in a.option_strings if o.startswith("--")}
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands = {name: {o for a in p._actions for o in a.option_strings if o.startswith("--")}
                for name, p in sub.choices.items()}
    return commands, globals_


GLOBAL_WITH_VALUE = {"--log-level"}
COMMAND_POSITION = {"", "|", "||", "&&", ";", "$", "exec", "time", "sudo"}


def _clean(token: str) -> str:
    return token.strip("[](),;`'\"").split("=", 1)[0]


def _is_placeholder(token: str) -> bool:
    word = token.strip("<>[]():")
    return token.startswith("<") or (word.isupper() and word.isalpha())


class Mention:
    """A `durablecache` invocation (subcommand and flags) or a quoted lone flag, with its place."""

    def __init__(self, where: str, command: str | None, flags: list[str], invocation: bool):
        self.where, self.command, self.flags, self.invocation = where, command, flags, invocation


def invocations(code: str) -> Iterator[tuple[str | None, list[str]]]:
    """(subcommand or None, flags after it) for each `durablecache` at a command position in code."""
    tokens = code.split()
    for i, tok in enumerate(tokens):
        if tok.strip("`") != "durablecache" and not tok.endswith("/durablecache"):
            continue
        if i > 0 and tokens[i - 1] not in COMMAND_POSITION:
            continue
        j = i + 1
        # Global options before the subcommand, also in usage form: `durablecache [--log-level L] proxy`.
        while j < len(tokens) and _clean(tokens[j]).startswith("--"):
            j += 2 if _clean(tokens[j]) in GLOBAL_WITH_VALUE and "=" not in tokens[j] else 1
        if j >= len(tokens) or _is_placeholder(tokens[j]):
            yield None, [f for t in tokens[i + 1:j] for f in _flags(t)]
            continue
        command = _clean(tokens[j])
        flags = []
        rest = tokens[j + 1:]
        for k, t in enumerate(rest):
            # A pipe ends the command, unless it separates alternatives in a usage line: (--a | --b).
            if t in {"||", "&&", ";"} or (t == "|" and not _clean(rest[k + 1] if k + 1 < len(rest) else "")
                                                              .startswith("-")):
                break
            flags += _flags(t)
        yield command, flags


def _flags(token: str) -> list[str]:
    """`--a`, `[--a`, `--a=1`, `--a/--b` -> the flag names."""
    return [_clean(p) for p in token.split("/") if _clean(p).startswith("--")]


def fenced_commands(body: str) -> list[str]:
    """Lines of a code block, with `\\` continuations and indented `[--option]` lines joined."""
    lines: list[str] = []
    for raw in body.replace("\\\n", " ").splitlines():
        stripped = raw.strip()
        if lines and (stripped.startswith("-") or stripped.startswith("[-")) and "durablecache" in lines[-1]:
            lines[-1] += " " + stripped
        else:
            lines.append(raw)
    return lines


def mentions(md: Path) -> Iterator[Mention]:
    """Every invocation and lone `--flag`, in document order; a lone flag takes the subcommand last
    named in the same section (None: none named since the last heading)."""
    text = md.read_text()
    pieces: list[tuple[int, str, str]] = []  # (offset, kind, text)
    for m in FENCE.finditer(text):
        pieces.append((m.start(), "fence", m.group(2)))
    fenced = [(m.start(), m.end()) for m in FENCE.finditer(text)]
    for m in INLINE.finditer(text):
        if not any(a <= m.start() < b for a, b in fenced):
            pieces.append((m.start(), "inline", m.group(2)))
    for m in re.finditer(r"^#{1,6}\s", text, re.M):
        if not any(a <= m.start() < b for a, b in fenced):
            pieces.append((m.start(), "heading", ""))
    context: str | None = None
    for offset, kind, body in sorted(pieces):
        line = text.count("\n", 0, offset) + 1
        where = f"{md.relative_to(ROOT).as_posix() if md.is_relative_to(ROOT) else md.name}:{line}"
        if kind == "heading":
            context = None
            continue
        code_lines = fenced_commands(body) if kind == "fence" else [" ".join(body.split())]
        found = False
        for code in code_lines:
            for command, flags in invocations(code):
                found = True
                context = command
                yield Mention(where, command, flags, True)
        if kind == "inline" and not found and body.strip().startswith("--"):
            flags = [_clean(t) for t in re.split(r"[\s/]+", body) if _clean(t).startswith("--")]
            yield Mention(where, context, flags, False)


def test_docs_name_only_real_subcommands_and_flags() -> None:
    commands, globals_ = cli()
    every_flag = set().union(*commands.values()) | globals_
    problems, seen_invocations, seen_flags = [], 0, 0
    for md in doc_files():
        for m in mentions(md):
            if m.invocation:
                seen_invocations += 1
                if m.command is None:
                    bad = [f for f in m.flags if f not in globals_]
                    problems += [f"{m.where}: `durablecache {f}` is not a global option" for f in bad]
                    continue
                if m.command not in commands:
                    problems.append(f"{m.where}: `durablecache {m.command}` is not a subcommand "
                                    f"(there are: {', '.join(sorted(commands))})")
                    continue
                allowed = commands[m.command]
            else:
                allowed = (commands.get(m.command, set()) | globals_) if m.command else every_flag
            for flag in m.flags:
                seen_flags += 1
                if flag not in allowed:
                    owner = f"`durablecache {m.command} --help`" if m.command else "any durablecache --help"
                    problems.append(f"{m.where}: {flag} is not in {owner}")
    assert seen_invocations >= 20 and seen_flags >= 50, (seen_invocations, seen_flags)
    assert not problems, "\n".join(problems)


def test_cli_checker_catches_made_up_commands_and_flags(tmp_path: Path) -> None:
    """Not vacuous: a subcommand that does not exist and a flag of the wrong subcommand are reported."""
    fake = tmp_path / "fake.md"
    fake.write_text("# A\n\nRun `durablecache teleport now`.\n\n"
                    "```\ndurablecache migrate --source A \\\n  --allow-nonempty\n```\n\n"
                    "## B\n\nWith `durablecache copy`, pass `--allow-nonempty`. Then `--no-such-flag`.\n\n"
                    "Not a command: helm install durablecache charts/durablecache-operator\n")
    found = [(m.command, m.flags, m.invocation) for m in mentions(fake)]
    assert found == [("teleport", [], True), ("migrate", ["--source", "--allow-nonempty"], True),
                     ("copy", [], True), ("copy", ["--allow-nonempty"], False), ("copy", ["--no-such-flag"], False)]
    commands, _ = cli()
    assert "teleport" not in commands
    assert "--allow-nonempty" not in commands["migrate"] and "--allow-nonempty" in commands["copy"]


def test_no_file_cites_a_design_note_outside_the_repository() -> None:
    """The design lives in docs/design.md; a bare DESIGN.md (the team's note, not shipped) is a dead
    reference wherever it appears: code, tests, benchmarks, docs."""
    roots = [ROOT / d for d in ("operator", "tests", "bench", "docs", "charts", "crds", "scripts")]
    files = [p for r in roots for p in r.rglob("*") if p.is_file() and p.suffix in {".py", ".md", ".yaml", ".c", ".sh"}]
    files.append(ROOT / "README.md")
    me = Path(__file__).resolve()
    offenders = [str(p.relative_to(ROOT)) for p in files
                 if p.resolve() != me and re.search(r"(?<![\w/])DESIGN\.md", p.read_text(errors="replace"))]
    assert offenders == []
    assert (DOCS / "design.md").exists()
