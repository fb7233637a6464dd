"""Every error class of the host side (CLI, lifecycle, sandbox, network, monitor), in one place.

Everything the CLI reports derives from ``CocoonError``: the CLI prints its message as one line
on stderr and one runc-style JSON line in ``--log``, and exits 1. The monitor's own errors
(``HotplugError``, ``ChannelError``, ``StartError``) carry what the monitor turns into a gRPC
status or a failed ready report; a hot-plug failure's kind is an ``ErrorKind``, so a typo is an
AttributeError at import time instead of a silent INTERNAL status.

May import: the standard library only.
"""

from __future__ import annotations

import enum


class ErrorKind(enum.Enum):
    """Why a VM operation was refused; each kind has one gRPC status (monitor.service)."""

    INVALID = "invalid"  # the request itself is wrong (INVALID_ARGUMENT)
    LIMIT = "limit"  # beyond what the VM was built to hold (RESOURCE_EXHAUSTED)
    FAILED = "failed"  # QEMU or the guest refused it; the VM is as it was (ABORTED)


# How a call that ran out of time reads (gRPC's own words are a bare "Deadline Exceeded").
DEADLINE_WORDS = "the sandbox did not finish it in time (Deadline Exceeded; see its console.log)"


class CocoonError(Exception):
    """Root of every error cocoon reports to the user (one line, names the cause)."""


class ConfigError(CocoonError):
    """A configuration file or value is wrong; the message names the file and the key."""


class HostError(CocoonError):
    """The host cannot do what was asked (missing binary, device, permission)."""


class SandboxError(CocoonError):
    """Starting, talking to or stopping a sandbox failed.

    ``details`` holds extra context (QEMU stderr tail, console tail) shown after the message.
    """

    def __init__(self, message: str, details: str = "") -> None:
        super().__init__(message)
        self.details = details

    def __str__(self) -> str:
        base = super().__str__()
        return f"{base}\n{self.details}" if self.details else base


class StateError(CocoonError):
    """State on disk is missing, locked by someone else, or invalid (e.g. a bad id)."""


class UsageError(CocoonError):
    """The command line does not parse or names something impossible (runc's usage errors)."""


class SpecError(CocoonError):
    """config.json is missing, malformed, or asks for something impossible."""


class HookError(CocoonError):
    """An OCI hook failed, timed out, or could not be run."""


class LifecycleError(CocoonError):
    """A verb cannot be done in the container's state, or the guest refused it."""


class SizingError(CocoonError):
    """The spec's CPU or memory cannot be turned into a VM size."""


class DeviceError(CocoonError):
    """A host device in ``linux.devices`` cannot be given to the VM."""


class NetworkError(CocoonError):
    """The network namespace cannot be scanned, bridged or restored."""


class HotplugError(Exception):
    """A hot-plug request the monitor refused or could not do; the VM is left as it was."""

    def __init__(self, kind: ErrorKind, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class ChannelError(Exception):
    """The agent channel could not be established or was lost."""


class StartError(Exception):
    """The monitor could not bring its sandbox up (reported on the ready fd)."""
