"""Where a bulk copy records how far it got, so a killed copy resumes instead of starting over.

The copier only needs ``load()`` and ``save(state)``; the CLI keeps the state in a file, the operator
keeps it in the resource's status.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Protocol

from .errors import UsageError


class CheckpointStore(Protocol):
    def load(self) -> dict[str, Any]: ...

    def save(self, state: dict[str, Any]) -> None: ...


class MemoryCheckpoint:
    def __init__(self, state: dict[str, Any] | None = None):
        self.state = state or {}

    def load(self) -> dict[str, Any]:
        return json.loads(json.dumps(self.state))

    def save(self, state: dict[str, Any]) -> None:
        self.state = json.loads(json.dumps(state))


class FileCheckpoint:
    """A JSON file, replaced atomically so a kill mid-write never leaves a torn checkpoint."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = Path(path)

    def load(self) -> dict[str, Any]:
        if not self.path.exists():
            return {}
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError) as exc:
            raise UsageError(f"state file {self.path} is unreadable: {exc}") from None
        if not isinstance(data, dict):
            raise UsageError(f"state file {self.path} is not a copy checkpoint")
        return data

    def save(self, state: dict[str, Any]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".checkpoint-")
        with os.fdopen(fd, "w") as f:
            json.dump(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
