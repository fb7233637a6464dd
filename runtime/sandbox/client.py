"""A connection to a running sandbox's monitor: the agent's stubs and the VM service's.

``Client(dir)`` dials ``<dir>/monitor.sock`` (the monitor forwards the agent's service there,
next to its own VM service), so every caller uses one set of stubs. ``rpc_error`` turns a
failed call into the one-line error the CLI reports.

May import: the standard library, grpc, cocoon.agent (stubs), cocoon.runtime.{errors,
vm_pb2_grpc, monitor.launch}.
"""

from __future__ import annotations

from pathlib import Path

import grpc

from cocoon.agent import agent_pb2_grpc
from cocoon.runtime import vm_pb2_grpc as vpbg
from cocoon.runtime.errors import DEADLINE_WORDS, LifecycleError, StateError
from cocoon.runtime.monitor import launch as L


def rpc_error(what: str, exc: grpc.RpcError) -> LifecycleError:
    """``what: <the agent's or monitor's details>``, for a call that failed; a deadline says
    so in words (the sandbox's monitor or guest did not finish in time)."""
    details = exc.details() if hasattr(exc, "details") else str(exc)
    code = exc.code() if hasattr(exc, "code") else None
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        details = DEADLINE_WORDS
    return LifecycleError(f"{what}: {details}")


class Client:
    """A connection to a running sandbox's monitor."""

    def __init__(self, d: Path, timeout: float = 30.0) -> None:
        sock = d / L.MONITOR_SOCK
        if not sock.exists():
            raise StateError(f"sandbox at {d} is not running (no {sock.name})")
        self.dir = d
        self.timeout = timeout
        self.channel = grpc.insecure_channel(f"unix:{sock}")
        self.agent = agent_pb2_grpc.AgentServiceStub(self.channel)
        self.vm = vpbg.VMStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
