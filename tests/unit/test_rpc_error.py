"""How a failed call to a sandbox reads: the agent's or monitor's own words, and a deadline
in words rather than gRPC's "Deadline Exceeded" alone."""

from __future__ import annotations

from cocoon.runtime.sandbox.client import CallError, rpc_error


def test_the_callees_details_are_kept() -> None:
    err = rpc_error("container c", CallError("UNKNOWN", "crun create: no such file"))
    assert str(err) == "container c: crun create: no such file"


def test_a_deadline_says_the_sandbox_did_not_finish_in_time() -> None:
    err = rpc_error("container c", CallError("DEADLINE_EXCEEDED", "Deadline Exceeded"))
    assert str(err).startswith("container c: the sandbox did not finish it in time")
    assert "console.log" in str(err)
