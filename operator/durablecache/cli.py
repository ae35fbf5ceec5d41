"""The ``durablecache`` command line: every subcommand lives in ``durablecache.commands``."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys
from collections.abc import Sequence
from types import ModuleType

from . import __version__, commands, logs
from .errors import DurableCacheError


def _command_modules() -> list[ModuleType]:
    mods = [importlib.import_module(f"{commands.__name__}.{m.name}")
            for m in pkgutil.iter_modules(commands.__path__) if not m.name.startswith("_")]
    return sorted(mods, key=lambda m: m.NAME)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="durablecache",
        description="Move live Valkey / Redis OSS data onto a durable ElastiCache cluster without losing a write.",
    )
    parser.add_argument("--version", action="version", version=f"durablecache {__version__}")
    parser.add_argument("--log-json", action="store_true", help="log JSON lines instead of key=value")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for mod in _command_modules():
        p = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logs.configure(json=args.log_json, level=args.log_level)
    try:
        return int(args._run(args))
    except DurableCacheError as exc:
        logs.get().debug("error", exc_info=True)    # --log-level debug: where it came from
        print(f"durablecache {args.command}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except (OSError, RuntimeError, ValueError) as exc:
        # Anything unforeseen still ends in one line; --log-level debug shows the details.
        logs.get().debug("unexpected error", exc_info=True)
        print(f"durablecache {args.command}: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"durablecache {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
