"""Hypothesis profiles for the fuzz targets, and the checks every target shares.

Two profiles: ``ci`` (the default: few examples per target, derandomized so every run of the
normal test command tries the same inputs, no example database) and ``full`` (selected with
``COCOON_FUZZ=full``, as ``scripts/fuzz`` does: thousands of examples per target, random, the
failures kept in ``.hypothesis/`` so the next run tries them first). Neither has a deadline:
the machine is shared and a slow example is not a bug; a hang is caught by the targets' own
timeouts.

No target boots a VM: the in-process ones stop before the sandbox (or have the sandbox
launcher replaced by one that refuses), the CLI ones give it a bundle that fails validation.
"""

from __future__ import annotations

import os

import pytest
from hypothesis import HealthCheck, settings

from cocoon.runtime.errors import CocoonError

_SUPPRESS = [HealthCheck.too_slow, HealthCheck.function_scoped_fixture]

settings.register_profile(
    "ci",
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    suppress_health_check=_SUPPRESS,
)
settings.register_profile(
    "full",
    max_examples=2500,
    deadline=None,
    print_blob=True,
    suppress_health_check=_SUPPRESS,
)
PROFILE = "full" if os.environ.get("COCOON_FUZZ") == "full" else "ci"
settings.load_profile(PROFILE)


def pytest_report_header(config: pytest.Config) -> str:
    return f"cocoon fuzz profile: {PROFILE} (COCOON_FUZZ=full for the long run)"


def check_clean(exc: BaseException) -> None:
    """A rejection is the project's own error with a short, non-empty, one-line message."""
    assert isinstance(exc, CocoonError), f"{type(exc).__name__} leaked: {exc!r}"
    msg = str(exc)
    assert msg.strip(), f"{type(exc).__name__} with an empty message"
    assert "\n" not in msg and "\r" not in msg, f"a message of several lines: {msg!r}"
    assert "Traceback" not in msg
    assert len(msg) < 8192, f"a message of {len(msg)} characters"
