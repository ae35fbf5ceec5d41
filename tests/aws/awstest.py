"""Helpers for the ElastiCache tests (imported by conftest.py and the tests)."""

from __future__ import annotations

import uuid
from typing import Any

REGION = "us-east-1"


class Recorder:
    """Every ElastiCache (or, attached to one, CloudWatch) call a client makes: the API parameters and
    the serialized request body.

    ``provide-client-params`` sees the parameters the provider passed; ``before-send`` sees the HTTP
    request botocore built from them, i.e. what AWS would receive.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.bodies: list[tuple[str, bytes]] = []
        self.services: dict[str, str] = {}

    def attach(self, client: Any, service: str = "elasticache") -> Any:
        client.meta.events.register(f"provide-client-params.{service}.*", self._params)
        client.meta.events.register(f"before-send.{service}.*", self._send)
        return client

    def _params(self, params: dict[str, Any], model: Any, **_: Any) -> None:
        self.calls.append((model.name, dict(params)))
        self.services[model.name] = model.service_model.service_id.hyphenize()   # the IAM prefix

    def _send(self, request: Any, **_: Any) -> None:
        body = request.body if isinstance(request.body, bytes) else str(request.body or "").encode()
        action = next((p.split("=", 1)[1] for p in body.decode().split("&") if p.startswith("Action=")), "")
        self.bodies.append((action, body))

    def operations(self) -> set[str]:
        return {name for name, _ in self.calls}

    def actions(self) -> set[str]:
        """The IAM actions of the calls: ``service:Operation``."""
        return {f"{self.services[name]}:{name}" for name, _ in self.calls}

    def params(self, operation: str) -> list[dict[str, Any]]:
        return [p for name, p in self.calls if name == operation]

    def body(self, operation: str) -> bytes:
        found = [b for name, b in self.bodies if name == operation]
        assert found, f"no {operation} request was sent"
        return found[-1]


class FakeClock:
    """Injected clock and sleep: polling runs at full speed, and tests see every delay asked for."""

    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"
