"""Real monitors forked by the state root's fork server (monitor.forkserver, sandbox.spawn):
one server for the root's monitors, which share its pages and look like any monitor; the
server gone with the last of them (the state root's leak check, which sees its command line,
runs after each test); a killed server harming no sandbox; a server started from a caller's
cgroup leaving it; and ``fork_monitors = false``. Monitors offer their memory to KSM
(``mergeable_monitors``) unless told not to."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cocoon.runtime.config import Config
from cocoon.runtime.monitor import hostcgroup
from cocoon.runtime.monitor import launch as L
from cocoon.runtime.sandbox import launcher as sandbox
from cocoon.runtime.sandbox import spawn
from tests.integration.procs import cgroup_of, parent_of

pytestmark = [pytest.mark.qemu, pytest.mark.root]
MIB = 1024 * 1024


def rollup_kib(pid: int, field: str) -> int:
    m = re.search(rf"^{field}:\s+(\d+) kB", Path(f"/proc/{pid}/smaps_rollup").read_text(), re.M)
    assert m, field
    return int(m.group(1))


def mergeable(pid: int) -> bool:
    """Whether the kernel has pid's heap marked for KSM (monitor.ksm; smaps' ``mg`` flag)."""
    lines = Path(f"/proc/{pid}/smaps").read_text().splitlines()
    at = next(i for i, line in enumerate(lines) if line.endswith("[heap]"))
    flags = next(line for line in lines[at + 1 :] if line.startswith("VmFlags:"))
    return "mg" in flags.split()[1:]


def answers(sb: sandbox.Sandbox) -> bool:
    with sb.client() as c:
        return bool(c.agent.Version(timeout=20)["api_hash"])


def test_the_monitors_of_a_root_are_forked_by_one_server_and_share_its_pages(
    cfg: Config, state_root: Path, image: sandbox.GuestFiles
) -> None:
    assert cfg.runtime.fork_monitors  # the default
    started = [sandbox.start(cfg, state_root, name) for name in ("fs1", "fs2")]
    try:
        (server,) = spawn.server_pids(state_root)
        for sb in started:
            assert isinstance(sb.process, spawn.Forked)
            assert parent_of(sb.monitor_pid) == server
            # Its command line is a monitor's: the identity checks find it as before.
            assert sandbox.our_monitor(sb.dir) == sb.monitor_pid
            assert answers(sb)
            # Pages written by the server's imports, still shared with it and the sibling.
            assert rollup_kib(sb.monitor_pid, "Shared_Dirty") >= 4 * 1024
            # Offered to KSM (mergeable_monitors, the default), but not so that what it
            # execs inherits it: QEMU's memory holds guest-derived data (monitor.ksm).
            assert mergeable(sb.monitor_pid)
            qemu = int((sb.dir / L.QEMU_PID).read_text())
            stat = Path(f"/proc/{qemu}/ksm_stat").read_text()
            assert "ksm_merge_any: yes" not in stat
        assert not mergeable(server)
    finally:
        for sb in started:
            sandbox.stop(state_root, sb.sandbox_id, cfg.runtime.shutdown_timeout_s)
    # Their exit statuses come from the server, which then ends.
    assert [sb.process.wait(30) for sb in started if sb.process] == [0, 0]
    deadline = time.monotonic() + 10
    while spawn.server_pids(state_root) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not spawn.server_pids(state_root)
    assert not spawn.socket_path(state_root).exists()


def test_a_killed_fork_server_harms_no_sandbox_and_the_next_start_has_a_new_one(
    cfg: Config, state_root: Path, image: sandbox.GuestFiles
) -> None:
    first = sandbox.start(cfg, state_root, "fk1")
    second = None
    try:
        (server,) = spawn.server_pids(state_root)
        os.kill(server, signal.SIGKILL)
        assert answers(first)
        second = sandbox.start(cfg, state_root, "fk2")
        (new,) = spawn.server_pids(state_root)
        assert new != server and parent_of(second.monitor_pid) == new
        assert answers(first) and answers(second)
    finally:
        for sb in (first, second):
            if sb is not None:
                sandbox.stop(state_root, sb.sandbox_id, cfg.runtime.shutdown_timeout_s)
    assert first.process is not None and first.process.wait(30) == spawn.UNKNOWN_STATUS
    assert second is not None and second.process is not None and second.process.wait(30) == 0


def test_fork_monitors_false_starts_each_monitor_afresh(
    cfg: Config, state_root: Path, image: sandbox.GuestFiles
) -> None:
    rt = dataclasses.replace(cfg.runtime, fork_monitors=False, mergeable_monitors=False)
    fresh = dataclasses.replace(cfg, runtime=rt)
    sb = sandbox.start(fresh, state_root, "nf1")
    try:
        assert isinstance(sb.process, subprocess.Popen)
        assert not spawn.server_pids(state_root)
        assert parent_of(sb.monitor_pid) == os.getpid()  # the launcher's child, as before
        assert not mergeable(sb.monitor_pid)  # mergeable_monitors = false
        assert answers(sb)
    finally:
        sandbox.stop(state_root, "nf1", cfg.runtime.shutdown_timeout_s)
    assert sb.process.wait(30) == 0


CALLER = """
import os, sys
from pathlib import Path
for d in sys.argv[2:]:
    Path(d, "cgroup.procs").write_text(str(os.getpid()))
from cocoon.runtime.config import Config
from cocoon.runtime.sandbox import launcher
sb = launcher.start(Config(), Path(sys.argv[1]), "cg1", cgroups_path=os.environ["POD"] + "/sbx")
print(sb.monitor_pid)
"""


def test_the_fork_server_keeps_no_callers_cgroup(
    cfg: Config, state_root: Path, image: sandbox.GuestFiles
) -> None:
    """A first launch from a caller in a cgroup of its own (conmon's, or a pod's under CRI-O's
    cgroupfs manager): the server it starts moves to the root cgroups, so the caller's cgroup
    can be removed once the caller is gone, with the sandbox still up."""
    top = f"cocoon-fs-caller-{os.getpid()}"
    callers = [point / top for point, _ in hostcgroup.hierarchies()]
    for d in callers:
        d.mkdir()
        for f in ("cpuset.cpus", "cpuset.mems"):  # v1 cpuset: none of either takes no process
            if (d / f).exists():
                (d / f).write_text((d.parent / f).read_text())
    pod = f"/{top}-pod"
    try:
        r = subprocess.run(
            [sys.executable, "-c", CALLER, str(state_root), *map(str, callers)],
            capture_output=True,
            text=True,
            timeout=300,
            env={**os.environ, "POD": pod},
        )
        assert r.returncode == 0, r.stderr
        monitor = int(r.stdout.split()[-1])
        (server,) = spawn.server_pids(state_root)
        assert parent_of(monitor) == server
        assert set(cgroup_of(server).values()) == {"/"}, cgroup_of(server)
        assert all(p == f"{pod}/cocoon-sandbox-cg1" for p in cgroup_of(monitor).values())
        for d in callers:
            d.rmdir()  # EBUSY if the server had stayed in it
    finally:
        with contextlib.suppress(Exception):
            sandbox.stop(state_root, "cg1", cfg.runtime.shutdown_timeout_s)
        deadline = time.monotonic() + 10
        while spawn.server_pids(state_root) and time.monotonic() < deadline:
            time.sleep(0.05)
        for d in callers:
            with contextlib.suppress(FileNotFoundError):
                d.rmdir()
