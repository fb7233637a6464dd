"""A running sandbox's monitor, called: the VM service's methods and the agent's.

``Client(dir)`` makes each call a connection to ``<dir>/stdio.sock`` carrying one framed JSON
request, which the monitor runs as the gRPC call a client of ``monitor.sock`` would make and
answers in JSON (monitor.calls has the protocol). The CLI so imports neither gRPC (~65 ms of
wall time a process) nor protobuf (~30 ms): ``c.vm.Resize({"vcpus": 2}, timeout=60)`` takes
and returns dicts in protobuf's JSON mapping with the .proto's field names (a response has
every field, 64-bit integers as strings, bytes as base64: ``b64`` makes them). A failed call
raises ``CallError`` with the gRPC status name; ``rpc_error`` turns it into the one-line error
the CLI reports. Streaming methods are gRPC's only (``monitor.sock``: tests use them).

May import: the standard library, cocoon.runtime.{errors, monitor.launch}.
"""

from __future__ import annotations

import base64
import json
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cocoon.runtime.errors import DEADLINE_WORDS, LifecycleError, StateError
from cocoon.runtime.monitor import launch as L

ANSWER_MAX = 16 * 1024 * 1024  # the longest response accepted
SLACK = 5.0  # beyond a call's timeout, for the monitor to answer DEADLINE_EXCEEDED itself


class CallError(Exception):
    """A call that failed: ``code`` is the gRPC status name (e.g. ``NOT_FOUND``), ``details``
    the agent's or the monitor's words."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(f"{code}: {details}")
        self.code = code
        self.details = details


def rpc_error(what: str, exc: CallError) -> LifecycleError:
    """``what: <the agent's or monitor's details>``, for a call that failed; a deadline says
    so in words (the sandbox's monitor or guest did not finish in time)."""
    details = DEADLINE_WORDS if exc.code == "DEADLINE_EXCEEDED" else exc.details
    return LifecycleError(f"{what}: {details}")


def b64(data: bytes) -> str:
    """A bytes field of a request."""
    return base64.b64encode(data).decode()


Method = Callable[..., dict[str, Any]]


class _Service:
    def __init__(self, client: Client, name: str) -> None:
        self._client = client
        self._name = name

    def __getattr__(self, method: str) -> Method:
        if not method[:1].isupper():
            raise AttributeError(method)

        def call(request: dict[str, Any] | None = None, timeout: float | None = None) -> Any:
            return self._client.call(f"{self._name}/{method}", request, timeout)

        return call


class Client:
    """A running sandbox's monitor; ``timeout`` is a call's default deadline in seconds."""

    def __init__(self, d: Path, timeout: float = 30.0) -> None:
        self.sock = d / L.STDIO_SOCK
        if not self.sock.exists():
            raise StateError(f"sandbox at {d} is not running (no {self.sock.name})")
        self.dir = d
        self.timeout = timeout
        self.agent = _Service(self, "AgentService")
        self.vm = _Service(self, "VM")

    def call(
        self, name: str, request: dict[str, Any] | None = None, timeout: float | None = None
    ) -> dict[str, Any]:
        """``name`` (``<service>/<method>``) called with ``request``; its response."""
        t = self.timeout if timeout is None else timeout
        body = json.dumps(request or {}).encode()
        head = json.dumps({"call": name, "size": len(body), "timeout": t}).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(t + SLACK)
            try:
                s.connect(str(self.sock))
                s.sendall(head + b"\n" + body)
                with s.makefile("rb") as f:
                    line = f.readline(4096)
                    answer = json.loads(line) if line.endswith(b"\n") else None
                    if isinstance(answer, dict) and type(answer.get("size")) is int:
                        size = answer["size"]
                        data = f.read(size) if 0 <= size <= ANSWER_MAX else b""
                        if len(data) == size:
                            out: dict[str, Any] = json.loads(data)
                            return out
            except TimeoutError:
                raise CallError("DEADLINE_EXCEEDED", "Deadline Exceeded") from None
            except (OSError, ValueError) as exc:
                raise CallError("UNAVAILABLE", f"the sandbox's monitor: {exc}") from None
        if isinstance(answer, dict) and isinstance(answer.get("error"), str):
            raise CallError(str(answer.get("code") or "UNKNOWN"), answer["error"])
        raise CallError("UNAVAILABLE", f"{name}: the sandbox's monitor ended the call unanswered")

    def close(self) -> None:
        pass

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
