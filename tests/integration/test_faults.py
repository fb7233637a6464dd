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
import signal
import subprocess
import time
from pathlib import Path

import pytest

from cocoon.runtime import faults
from cocoon.runtime.container import busybox
from cocoon.runtime.monitor import launch as L
from cocoon.runtime.sandbox import paths
from cocoon.testing.leaks import live_processes
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


# ------------------------------------------------------------------ the host itself fails


def test_a_full_state_filesystem_is_one_error(tmp_path: Path) -> None:
    """--root on a 1 MiB tmpfs filled to 4 KiB free, then to 24 KiB free (the VM boots, a
    later write fails): one error, exit 1, nothing of the container left."""
    root = tmp_path / "root"
    root.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(root)], check=True)
    try:
        cli = Cli(root, tmp_path)
        b = busybox.make_bundle(tmp_path / "b", ["sleep", "100000"])
        for free_kib in (4, 24):
            fill = root / "fill"
            fill.unlink(missing_ok=True)
            fill.write_bytes(b"\0" * ((1024 - free_kib) * 1024))
            r = cli.create("full", b)
            assert r.returncode == 1, r.stderr
            assert "No space left on device" in r.stderr and "Traceback" not in r.stderr
            assert "No space left on device" in cli.last_error()
            assert not list((root / "containers").iterdir())
            assert not list((root / "sandboxes").iterdir())
        deadline = time.monotonic() + 15
        while any(str(root) in cmd for _, cmd in live_processes()):
            assert time.monotonic() < deadline, "processes of the full root left"
            time.sleep(0.1)
    finally:
        subprocess.run(["umount", str(root)], check=True)


@pytest.mark.parametrize("nofile", [8, 16, 24])
def test_too_many_open_files_is_one_error(cli: Cli, tmp_path: Path, nofile: int) -> None:
    """The CLI (and so QEMU, its grandchild) with a tiny RLIMIT_NOFILE: each step that runs out
    of descriptors fails the create with one error and undoes it."""
    b = busybox.make_bundle(tmp_path / "b", ["sleep", "100000"])
    r = subprocess.run(
        ["prlimit", f"--nofile={nofile}", *cli.argv, "create", "--bundle", str(b), "em"],
        stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=240,
    )  # fmt: skip
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.startswith("cocoon: ")
    assert cli.ok("list", "-q").split() == []


def test_stale_state_after_a_host_reboot_never_touches_other_processes(
    cli: Cli, tmp_path: Path
) -> None:
    """A reboot simulated: every process of a running container's sandbox SIGKILLed (nothing
    of it gets to clean up), and its pid files then naming live processes that are not ours.
    state says stopped, kill is refused, delete --force cleans up: none of the other
    processes is signalled or waited for."""
    assert (
        cli.create("rb", busybox.make_bundle(tmp_path / "b", ["sleep", "100000"])).returncode == 0
    )
    cli.ok("start", "rb")
    d = paths.sandbox_dir(cli.root, "rb")
    st_file = cli.root / "containers" / "rb" / "state.json"
    st = json.loads(st_file.read_text())
    ours = [st["pid"], int((d / L.MONITOR_PID).read_text()), int((d / L.QEMU_PID).read_text())]
    ours += faults.victims("virtiofsd", d, 0)
    for pid in ours:
        os.kill(pid, signal.SIGKILL)
    others = [subprocess.Popen(["sleep", "1000"]) for _ in range(3)]
    try:
        st["pid"] = others[0].pid
        st_file.write_text(json.dumps(st))
        (d / L.MONITOR_PID).write_text(f"{others[1].pid}\n")
        (d / L.QEMU_PID).write_text(f"{others[2].pid}\n")
        assert status_of(cli, "rb") == "stopped"
        r = cli("kill", "rb", "KILL")
        assert r.returncode == 1 and "container not running" in r.stderr, r.stderr
        t = time.monotonic()
        cli.ok("delete", "--force", "rb")
        assert time.monotonic() - t < 15  # no wait on a pid that is not ours
        assert status_of(cli, "rb") is None
        assert all(p.poll() is None for p in others), "a process that was not ours was killed"
    finally:
        for p in others:
            p.kill()
            p.wait()
