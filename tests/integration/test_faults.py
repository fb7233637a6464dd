"""Faults at every step, with real guests (issue 15): the CLI SIGKILLs one process (QEMU, the
monitor, virtiofsd, the container's or exec's shim, or the CLI itself) at a fault point between
two steps of create, start, exec, update and delete (cocoon.runtime.faults). After each: the
verb ends (no hang) with one clean error or its normal result, never a traceback; ``state``
tells the truth (an error for a container whose create never finished, ``stopped`` once its VM
is gone); ``delete --force`` removes everything; and the state root's leak check finds no
process, mount, state dir or host cgroup.

Marked ``soak``: the test command runs each point once and each victim at least once (seven
cases); ``scripts/soak`` (COCOON_SOAK=full) runs every point with every victim. The agent
itself is not a victim: it is the guest's PID 1, which no signal from inside the guest kills;
its end is a guest panic, i.e. QEMU's exit, which the qemu victim covers."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from cocoon.runtime import faults
from cocoon.runtime.container import busybox
from tests.integration.cli import Cli

pytestmark = [pytest.mark.qemu, pytest.mark.root, pytest.mark.soak]

FULL = os.environ.get("COCOON_SOAK") == "full"
VM_VICTIMS = ("monitor", "qemu", "virtiofsd")


def cases() -> list[tuple[str, str]]:
    if FULL:
        return [(p, v) for p in faults.POINTS for v in faults.VICTIMS]
    victims = ["qemu", "cli", "virtiofsd", "shim", "monitor", "qemu", "cli"]
    return list(zip(faults.POINTS, victims, strict=True))


def no_traceback(r: subprocess.CompletedProcess[str]) -> None:
    """No traceback, and a failure is one line. create's stderr is also the container's (the
    shim keeps it, as runc's container does): a shim that lost its workload says so there."""
    assert "Traceback" not in r.stderr, r.stderr
    ours = [x for x in r.stderr.strip().splitlines() if not x.startswith("cocoon-shim:")]
    if r.returncode == 1:
        assert len(ours) == 1, r.stderr


def status_of(cli: Cli, cid: str) -> str | None:
    """The container's status, or None when ``state`` says it does not exist (one error)."""
    r = cli("state", cid)
    no_traceback(r)
    if r.returncode:
        assert "does not exist" in r.stderr, r.stderr
        return None
    return str(json.loads(r.stdout)["status"])


@pytest.mark.parametrize(("point", "victim"), cases(), ids=lambda x: str(x))
def test_a_process_killed_at_each_step_leaves_a_truthful_state_and_nothing_behind(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, point: str, victim: str
) -> None:
    b = busybox.make_bundle(tmp_path / "f", ["sleep", "100000"])
    verb = point.partition(":")[0]
    if verb != "create":
        assert cli.create("f1", b).returncode == 0
        if verb != "start":
            cli.ok("start", "f1")
    monkeypatch.setenv(faults.ENV, f"{point}:{victim}")
    args = {
        "create": ["create", "--bundle", str(b), "f1"],
        "start": ["start", "f1"],
        "exec": ["exec", "f1", "sh", "-c", "echo hi; sleep 100"],
        "update": ["update", "--memory", "300M", "f1"],
        "delete": ["delete", "--force", "f1"],
    }[verb]
    r = cli.create("f1", b) if verb == "create" else cli(*args, timeout=120)
    monkeypatch.delenv(faults.ENV)
    if victim == "cli":
        assert r.returncode == -9, (r.returncode, r.stderr)
    else:
        no_traceback(r)

    st = status_of(cli, "f1")
    if victim in VM_VICTIMS and st is not None:
        deadline = time.monotonic() + 30  # the VM is gone, so is the container
        while st != "stopped":
            assert time.monotonic() < deadline, f"state says {st} with its {victim} killed"
            time.sleep(0.2)
            st = status_of(cli, "f1")
    if verb == "delete" and victim != "cli":
        assert st is None or r.returncode == 1, (st, r.returncode, r.stderr)
    if st == "running":  # what still runs still answers
        assert cli("exec", "f1", "true").returncode == 0

    r = cli("delete", "--force", "f1")
    assert r.returncode == 0, r.stderr
    assert status_of(cli, "f1") is None
    # the state_root fixture checks processes, mounts, state dirs and host cgroups
