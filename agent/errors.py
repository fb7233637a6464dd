"""Every error class of the agent, in one place, and the kinds the host sees as gRPC codes.

Each ``AgentError`` carries an ``ErrorKind``; the gRPC service (``server``) answers it with the
kind's status code and the error's message as the details, so the kind is the whole contract
with the host. A ``ContainerError``'s kind is chosen where it is raised; a ``DeviceError`` is
always PRECONDITION and a ``NetError`` always INVALID. A kind is an enum member, so a typo is
an AttributeError at import time instead of a silent INTERNAL status.

``MuxProtocolError`` never reaches gRPC: it belongs to the frame codec (``mux``), which the
host monitor shares, so this module stays standard library only.

May import: the standard library.
"""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    """Why the agent refused a request; each kind has one gRPC status (server._CODES)."""

    NOT_FOUND = "not-found"  # no such container or process (NOT_FOUND)
    EXISTS = "exists"  # the container id is taken (ALREADY_EXISTS)
    INVALID = "invalid"  # the request itself is wrong (INVALID_ARGUMENT)
    PRECONDITION = "precondition"  # not possible in the current state (FAILED_PRECONDITION)
    INTERNAL = "internal"  # the guest failed to do it: crun, the kernel (INTERNAL)


class AgentError(Exception):
    """Root of the agent's own errors; ``kind`` decides the gRPC status."""

    kind: ErrorKind = ErrorKind.INTERNAL


class ContainerError(AgentError):
    """A container or process request failed; ``kind`` says why."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class DeviceError(AgentError):
    """A hot-plugged CPU or device could not be brought up or found."""

    kind = ErrorKind.PRECONDITION


class NetError(AgentError):
    """An interface, route or neighbour could not be set as the host asked."""

    kind = ErrorKind.INVALID


class MuxProtocolError(AgentError):
    """The peer sent bytes that are not a frame (only possible before a HELLO resync)."""
