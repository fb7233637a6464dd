"""Forwards the agent's gRPC service through the monitor, unchanged, as raw bytes.

Handlers are generated from agent.proto's descriptor, one per method with its own
cardinality (unary or streaming either way), so the monitor never needs to know message types
and a new agent method is forwarded without code here. Deadlines and cancellation carry over;
the agent's status codes and details are returned as they are.

May import: the standard library, grpc, cocoon.runtime.monitor.agentcalls (the service's
descriptor).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio

from cocoon.runtime.monitor import agentcalls

SERVICE = agentcalls.SERVICE
SERVICE_NAME = SERVICE.full_name

ChannelGetter = Callable[[], "grpc.aio.Channel | None"]


def _channel(get: ChannelGetter) -> grpc.aio.Channel:
    ch = get()
    if ch is None:
        raise _Unavailable()
    return ch


class _Unavailable(Exception):
    pass


async def _abort(context: grpc.aio.ServicerContext[Any, Any], exc: BaseException) -> None:
    if isinstance(exc, grpc.aio.AioRpcError):
        await context.abort(exc.code(), exc.details() or "")
    await context.abort(grpc.StatusCode.UNAVAILABLE, "the sandbox's agent is not connected")


def handlers(get_channel: ChannelGetter) -> grpc.GenericRpcHandler:
    table: dict[str, grpc.RpcMethodHandler] = {}
    for m in SERVICE.methods:
        path = f"/{SERVICE_NAME}/{m.name}"
        # The grpc.aio multicallable with the same cardinality, e.g. "stream_unary".
        kind = agentcalls.cardinality(m)
        make = _streaming if m.server_streaming else _single
        wrap = getattr(grpc, f"{kind}_rpc_method_handler")
        table[m.name] = wrap(make(path, get_channel, kind))
    return grpc.method_handlers_generic_handler(SERVICE_NAME, table)


def _single(path: str, get: ChannelGetter, kind: str) -> Any:
    """A handler for a method with one response (request may be a stream)."""

    async def h(req: Any, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        try:
            call = getattr(_channel(get), kind)(path)
            resp: bytes = await call(req, timeout=context.time_remaining())
            return resp
        except (grpc.aio.AioRpcError, _Unavailable) as exc:
            await _abort(context, exc)
            raise AssertionError("unreachable") from exc

    return h


def _streaming(path: str, get: ChannelGetter, kind: str) -> Any:
    """A handler for a method with a response stream (request may be a stream)."""

    async def h(req: Any, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        try:
            call = getattr(_channel(get), kind)(path)(req, timeout=context.time_remaining())
            async for msg in call:
                yield msg
        except (grpc.aio.AioRpcError, _Unavailable) as exc:
            await _abort(context, exc)

    return h
