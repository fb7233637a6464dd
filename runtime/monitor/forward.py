"""Forwards the agent's gRPC service through the monitor, unchanged, as raw bytes.

Handlers are generated from agent.proto's descriptor, one per method with its own
cardinality (unary or streaming either way), so the monitor never needs to know message types
and a new agent method is forwarded without code here. Deadlines and cancellation carry over;
the agent's status codes and details are returned as they are.

May import: the standard library, grpc, cocoon.agent.agent_pb2.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
import grpc.aio

from cocoon.agent import agent_pb2

SERVICE = agent_pb2.DESCRIPTOR.services_by_name["AgentService"]
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
        cs, ss = m.client_streaming, m.server_streaming
        if not cs and not ss:
            table[m.name] = grpc.unary_unary_rpc_method_handler(_unary_unary(path, get_channel))
        elif not cs and ss:
            table[m.name] = grpc.unary_stream_rpc_method_handler(_unary_stream(path, get_channel))
        elif cs and not ss:
            table[m.name] = grpc.stream_unary_rpc_method_handler(_stream_unary(path, get_channel))
        else:
            table[m.name] = grpc.stream_stream_rpc_method_handler(_stream_stream(path, get_channel))
    return grpc.method_handlers_generic_handler(SERVICE_NAME, table)


def _unary_unary(path: str, get: ChannelGetter) -> Any:
    async def h(req: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        try:
            call = _channel(get).unary_unary(path)
            resp: bytes = await call(req, timeout=context.time_remaining())
            return resp
        except (grpc.aio.AioRpcError, _Unavailable) as exc:
            await _abort(context, exc)
            raise AssertionError("unreachable") from exc

    return h


def _unary_stream(path: str, get: ChannelGetter) -> Any:
    async def h(req: bytes, context: grpc.aio.ServicerContext[Any, Any]) -> AsyncIterator[bytes]:
        try:
            call = _channel(get).unary_stream(path)(req, timeout=context.time_remaining())
            async for msg in call:
                yield msg
        except (grpc.aio.AioRpcError, _Unavailable) as exc:
            await _abort(context, exc)

    return h


def _stream_unary(path: str, get: ChannelGetter) -> Any:
    async def h(reqs: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]) -> bytes:
        try:
            call = _channel(get).stream_unary(path)
            resp: bytes = await call(reqs, timeout=context.time_remaining())
            return resp
        except (grpc.aio.AioRpcError, _Unavailable) as exc:
            await _abort(context, exc)
            raise AssertionError("unreachable") from exc

    return h


def _stream_stream(path: str, get: ChannelGetter) -> Any:
    async def h(
        reqs: AsyncIterator[bytes], context: grpc.aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[bytes]:
        try:
            call = _channel(get).stream_stream(path)(reqs, timeout=context.time_remaining())
            async for msg in call:
                yield msg
        except (grpc.aio.AioRpcError, _Unavailable) as exc:
            await _abort(context, exc)

    return h
