"""monitor.hostcgroup on this host's real cgroupfs (every v1 hierarchy and the v2 one): a
process joins the sandbox's cgroup under a pod cgroup and leaves it, and what was made for it
goes, while what the caller made stays."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cocoon.runtime.monitor import hostcgroup as H
from cocoon.testing.leaks import sandbox_cgroups
from tests.integration.procs import cgroup_of

pytestmark = [pytest.mark.root]


@pytest.fixture
def sleeper() -> Iterator[int]:
    p = subprocess.Popen(["sleep", "600"])
    try:
        yield p.pid
    finally:
        p.kill()
        p.wait()


def test_a_process_joins_the_sandbox_cgroup_in_every_hierarchy_and_leaves(sleeper: int) -> None:
    top = f"/cocoon-test-{os.getpid()}"
    points = [point for point, _ in H.hierarchies()]
    assert points, "no cgroup hierarchy mounted"
    before = cgroup_of(sleeper)
    hc = H.make(f"{top}/pod1/sbx", "t1")
    try:
        H.join(hc, sleeper)
        now = cgroup_of(sleeper)
        assert len(now) == len(before)
        for ctrls, path in now.items():
            assert path == f"{top}/pod1/cocoon-sandbox-t1", (ctrls, path)
    finally:
        H.leave(hc, sleeper)
    assert cgroup_of(sleeper) == before, "back where it came from"
    assert not any((p / top.lstrip("/")).exists() for p in points), "what was made is gone"
    assert not sandbox_cgroups()


def test_the_pod_cgroup_the_caller_made_stays(sleeper: int) -> None:
    top = Path(f"/cocoon-test-{os.getpid()}")
    points = [point for point, _ in H.hierarchies()]
    pods = [p / top.relative_to("/") / "pod2" for p in points]
    for d in pods:
        d.mkdir(parents=True)
    try:
        hc = H.make(f"{top}/pod2/sbx", "t2")
        assert sorted(hc.made) == sorted(str(d / "cocoon-sandbox-t2") for d in pods)
        H.join(hc, sleeper)
        H.leave(hc, sleeper)
        assert all(d.is_dir() and not list(d.glob("cocoon-sandbox-*")) for d in pods)
    finally:
        for d in pods:
            d.rmdir()
            d.parent.rmdir()
