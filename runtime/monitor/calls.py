"""Unary calls as JSON over ``stdio.sock``, so that the CLI imports neither gRPC nor protobuf.

Importing grpc costs a CLI ~65 ms of wall time and the agent's protobuf messages ~30 ms
(docs/performance.md), more than the work of most of its verbs. So the CLI's calls to a
sandbox (sandbox.client) are framed lines on the socket the shims already use, and the monitor,
which has both loaded anyway, turns them into the same calls a gRPC client of ``monitor.sock``
makes:

* The connection's first line is ``{"call": "<service>/<method>", "size": N, "timeout": T}``
  (at most stdio.HELLO_MAX bytes); N bytes of the request follow, as JSON in protobuf's JSON
  mapping (json_format; field names as in the .proto). The service is ``VM`` (the monitor's
  own, served by service.TABLE as its gRPC server serves it) or ``AgentService`` (forwarded
  to the guest's agent, as monitor.forward forwards it).
* The monitor answers one line, ``{"size": M}`` followed by M bytes of the response as JSON
  (every field, defaults included; 64-bit integers as strings and bytes in base64, as the
  mapping has them), or ``{"error": details, "code": C}`` with C a gRPC status name, and
  closes the connection. After T seconds the call is cancelled and the answer is
  DEADLINE_EXCEEDED; a client that goes away cancels its call (as a cancelled gRPC call
  would: the agent kills a process whose wait was abandoned).
* A request that does not parse is INVALID_ARGUMENT; a method that streams is UNIMPLEMENTED
  here (gRPC clients of ``monitor.sock`` have those).

May import: the standard library, grpc, google.protobuf (json_format), cocoon.agent.agent_pb2,
cocoon.runtime.{errors, vm_pb2, monitor.{agentcalls, service}}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc
import grpc.aio
from google.protobuf import json_format

from cocoon.agent import agent_pb2 as apb
from cocoon.runtime import vm_pb2 as vpb
from cocoon.runtime.errors import HotplugError, NetworkError
from cocoon.runtime.monitor import agentcalls, service

log = logging.getLogger("cocoon.monitor.calls")

CALL_MAX = 4 * 1024 * 1024  # a request's JSON, as gRPC's default message limit
TIMEOUT_MAX = 24 * 3600.0
SERVICES = {"VM": (service.SERVICE, vpb), "AgentService": (agentcalls.SERVICE, apb)}


class BadCall(Exception):
    pass


@dataclass(frozen=True)
class Header:
    service: str
    method: str
    size: int
    timeout: float


def parse_header(h: dict[str, Any]) -> Header:
    """A call's first line (already a JSON object), checked field by field."""
    name, size, timeout = h.pop("call", None), h.pop("size", None), h.pop("timeout", None)
    if h:
        raise BadCall(f"unknown field {sorted(h)[0]!r}")
    if not isinstance(name, str) or name.count("/") != 1:
        raise BadCall("call must be a string <service>/<method>")
    svc, method = name.split("/")
    if svc not in SERVICES or method not in SERVICES[svc][0].methods_by_name:
        raise BadCall(f"no method {name}")
    if type(size) is not int or not 0 <= size <= CALL_MAX:
        raise BadCall(f"size must be 0..{CALL_MAX}")
    if type(timeout) not in (int, float) or not 0 < timeout <= TIMEOUT_MAX:
        raise BadCall(f"timeout must be a number of seconds in (0, {TIMEOUT_MAX:.0f}]")
    return Header(svc, method, size, float(timeout))


class Failed(Exception):
    """A call's failure as its answer has it: a gRPC status name and the details."""

    def __init__(self, code: str, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class Calls:
    """Runs the calls of one sandbox: the VM service's handlers with ``svc``, the agent's
    methods over ``channel()`` (None while the agent is not connected)."""

    def __init__(
        self, svc: service.Service, channel: Callable[[], grpc.aio.Channel | None]
    ) -> None:
        self._svc = svc
        self._channel = channel

    async def answer(self, h: Header, body: bytes) -> bytes:
        """The answer's line (and its JSON, for a response)."""
        try:
            out = json.dumps(self._plain(await self.run(h, body))).encode()
        except Failed as exc:
            return json.dumps({"error": exc.details, "code": exc.code}).encode() + b"\n"
        return json.dumps({"size": len(out)}).encode() + b"\n" + out

    async def run(self, h: Header, body: bytes) -> Any:
        """The response message; Failed for anything else."""
        desc, module = SERVICES[h.service]
        m = desc.methods_by_name[h.method]
        if m.client_streaming or m.server_streaming:
            raise Failed("UNIMPLEMENTED", f"{h.method} streams: call it over gRPC")
        req_type = getattr(module, m.input_type.name)
        try:
            req = json_format.Parse(body.decode(), req_type())
        except (json_format.ParseError, UnicodeDecodeError) as exc:
            raise Failed("INVALID_ARGUMENT", f"{h.method}: {exc}") from None
        try:
            async with asyncio.timeout(h.timeout):
                if h.service == "VM":
                    await self._svc.settled(refuse=h.method != "Shutdown")
                    return await service.TABLE[h.method](self._svc, req)
                # A claim's cgroup move overlaps with the claimer's next call, the create.
                resp = await self._agent(h, req)
                await self._svc.settled()
                return resp
        except Failed:
            raise
        except TimeoutError:
            raise Failed("DEADLINE_EXCEEDED", "Deadline Exceeded") from None
        except grpc.aio.AioRpcError as exc:
            raise Failed(exc.code().name, exc.details() or str(exc.code())) from None
        except (service.Refused, HotplugError, NetworkError) as exc:
            code, details = service.status_for(exc)
            raise Failed(code.name, details) from None
        except Exception as exc:  # as grpc.aio answers a handler's uncaught exception
            log.exception("%s/%s failed", h.service, h.method)
            raise Failed("UNKNOWN", f"{type(exc).__name__}: {exc}") from None

    async def _agent(self, h: Header, req: Any) -> Any:
        ch = self._channel()
        if ch is None:
            raise Failed("UNAVAILABLE", "the sandbox's agent is not connected")
        return await getattr(agentcalls.Stub(ch), h.method)(req, timeout=h.timeout)

    @staticmethod
    def _plain(msg: Any) -> dict[str, Any]:
        out: dict[str, Any] = json_format.MessageToDict(
            msg, preserving_proto_field_name=True, always_print_fields_with_no_presence=True
        )
        return out


async def serve(
    calls: Calls,
    h: Header,
    body: bytes,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
) -> None:
    """One call on its connection: answered, or cancelled when the client goes away first."""
    task = asyncio.ensure_future(calls.answer(h, body))
    gone = asyncio.ensure_future(reader.read(1))  # the client sends nothing more: EOF, or gone
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not task.done():
            log.info("the client of %s/%s went away: the call is cancelled", h.service, h.method)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            return
        writer.write(task.result())
        await writer.drain()
    finally:
        gone.cancel()
        task.cancel()
