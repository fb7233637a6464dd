"""monitor.qemuuser: the host-wide allocation of non-root QEMU uids (markers under a flock,
stale ones taken over, a uid some process still runs as never reused) and the hand-over of
a VFIO group's node."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from cocoon.runtime.monitor import qemuuser
from cocoon.runtime.pids import pid_alive, start_time

FIRST = 1_900_000_000

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (chown, setuid)")


def test_allocate_marks_a_uid_in_range_and_release_frees_it(tmp_path: Path) -> None:
    a = qemuuser.allocate(FIRST, 16, "sandbox-a", tmp_path)
    b = qemuuser.allocate(FIRST, 16, "sandbox-a", tmp_path)  # same seed: the next free one
    assert FIRST <= a < FIRST + 16 and FIRST <= b < FIRST + 16 and a != b
    assert (tmp_path / str(a)).read_text().split()[0] == str(os.getpid())
    qemuuser.release(a, tmp_path)
    assert not (tmp_path / str(a)).exists() and (tmp_path / str(b)).exists()
    assert qemuuser.allocate(FIRST, 16, "sandbox-a", tmp_path) == a


def test_exhausted_range_is_an_error_naming_the_keys(tmp_path: Path) -> None:
    qemuuser.allocate(FIRST, 2, "x", tmp_path)
    qemuuser.allocate(FIRST, 2, "x", tmp_path)
    with pytest.raises(qemuuser.UidError, match=r"all 2 QEMU uids .* rootless_uid_count"):
        qemuuser.allocate(FIRST, 2, "x", tmp_path)


def test_release_leaves_another_monitors_uid(tmp_path: Path) -> None:
    (tmp_path / str(FIRST)).write_text("1 12345\n")
    qemuuser.release(FIRST, tmp_path)
    assert (tmp_path / str(FIRST)).exists()


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_stale_marker_of_a_dead_monitor_is_taken_over(tmp_path: Path) -> None:
    (tmp_path / str(FIRST)).write_text(f"{_dead_pid()} 1\n")
    (tmp_path / str(FIRST + 1)).write_text("garbage")
    got = {qemuuser.allocate(FIRST, 2, "s", tmp_path) for _ in range(2)}
    assert got == {FIRST, FIRST + 1}


def test_live_monitors_marker_is_skipped(tmp_path: Path) -> None:
    pid = os.getppid()
    (tmp_path / str(FIRST)).write_text(f"{pid} {start_time(pid)}\n")
    assert qemuuser.allocate(FIRST, 2, "s", tmp_path) == FIRST + 1
    # the same pid with another start time is a reused pid: stale
    (tmp_path / str(FIRST)).write_text(f"{pid} 1\n")
    assert qemuuser.allocate(FIRST, 1, "s", tmp_path) == FIRST


@root_only
def test_uid_a_process_still_runs_as_is_never_reused(tmp_path: Path) -> None:
    """A QEMU that outlived its monitor keeps its uid: no second QEMU may share it."""
    uid = FIRST + 7
    child = subprocess.Popen(["sleep", "30"], user=uid, group=uid, extra_groups=[])
    try:
        assert qemuuser.uid_in_use(uid) and qemuuser.uids_of(child.pid) == (uid,) * 4
        (tmp_path / str(uid)).write_text(f"{_dead_pid()} 1\n")
        assert qemuuser.allocate(uid, 2, "s", tmp_path) == uid + 1
    finally:
        child.kill()
        child.wait()
    assert not qemuuser.uid_in_use(uid)


def _grab(d: str, q: Any, done: Any) -> None:
    q.put(qemuuser.allocate(FIRST, 64, "same-seed", Path(d)))
    done.wait(30)  # a live monitor: its marker is not stale


def test_concurrent_monitors_get_distinct_uids(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("fork")
    q, done = ctx.Queue(), ctx.Event()
    procs = [ctx.Process(target=_grab, args=(str(tmp_path), q, done)) for _ in range(12)]
    for p in procs:
        p.start()
    try:
        got = [q.get(timeout=30) for _ in procs]
    finally:
        done.set()
        for p in procs:
            p.join()
    assert len(set(got)) == 12


@root_only
def test_grant_hands_the_node_over_and_revoke_gives_it_back(tmp_path: Path) -> None:
    node = tmp_path / "7"
    node.write_bytes(b"")
    os.chown(node, 0, 5)
    owner = qemuuser.grant(node, FIRST)
    assert owner == (0, 5) and (node.stat().st_uid, node.stat().st_gid) == (FIRST, FIRST)
    qemuuser.revoke(node, owner)
    assert (node.stat().st_uid, node.stat().st_gid) == (0, 5)
    with pytest.raises(qemuuser.UidError, match="does not exist"):
        qemuuser.grant(tmp_path / "8", FIRST)


def test_capabilities_and_uids_of_this_process() -> None:
    assert qemuuser.uids_of(os.getpid())[0] == os.getuid()
    assert qemuuser.uids_of(_dead_pid()) == ()
    assert qemuuser.capabilities_of(_dead_pid()) == -1
    assert sys.platform == "linux"


def test_release_stale_frees_a_dead_monitors_uid_only(tmp_path: Path) -> None:
    (tmp_path / str(FIRST)).write_text(f"{_dead_pid()} 1\n")
    pid = os.getppid()
    (tmp_path / str(FIRST + 1)).write_text(f"{pid} {start_time(pid)}\n")
    qemuuser.release_stale(FIRST, tmp_path)
    qemuuser.release_stale(FIRST + 1, tmp_path)
    qemuuser.release_stale(FIRST + 2, tmp_path)  # no marker: nothing to do
    assert not (tmp_path / str(FIRST)).exists() and (tmp_path / str(FIRST + 1)).exists()


@root_only
def test_a_zombie_holds_no_uid(tmp_path: Path) -> None:
    """A QEMU that died but is not reaped yet (its monitor was SIGKILLed, nobody waited for
    it) runs nothing as its uid any more."""
    uid = FIRST + 9
    child = subprocess.Popen(["true"], user=uid, group=uid, extra_groups=[])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{child.pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    try:
        assert qemuuser.uids_of(child.pid) == () and not qemuuser.uid_in_use(uid)
        assert not pid_alive(child.pid)
    finally:
        child.wait()
