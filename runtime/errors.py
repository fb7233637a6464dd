"""The runtime's error tree. Every error the CLI reports derives from CocoonError.

May import: the standard library only.
"""

from __future__ import annotations


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
