"""monitor.hostcgroup: where a sandbox's host processes go, on a fake /proc and fake cgroup
mounts (tests/integration/test_hostcgroup.py does it on the host's real cgroupfs)."""

from __future__ import annotations

import os
import signal
import subprocess
from pathlib import Path

import pytest

from cocoon.runtime.monitor import hostcgroup as H
from cocoon.runtime.monitor.launch import HostCgroup, LaunchSpec
from tests.unit.fakes import launch_spec


@pytest.mark.parametrize(
    ("path", "pod"),
    [
        ("/kubepods/pod123/abc", "/kubepods/pod123"),
        ("/kubepods/burstable/pod1/abc/", "/kubepods/burstable/pod1"),
        ("/docker/abc", "/docker"),
        ("/abc", "/"),
        ("libpod_parent/x", "/libpod_parent"),
        (
            "kubepods-besteffort-pod12.slice:cri-containerd:abc",
            "/kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod12.slice",
        ),
        ("system.slice:docker:abc", "/system.slice"),
        (":docker:abc", "/system.slice"),
        ("-.slice:x:abc", "/"),
        ("", None),
    ],
)
def test_the_pod_cgroup_is_the_parent_of_cgroups_path(path: str, pod: str | None) -> None:
    assert H.pod_cgroup(path) == pod


@pytest.mark.parametrize(
    "path",
    ["/kubepods/../etc/abc", "/a/./b", "kubepods-.slice:x:y", "notaslice:x:y", "a/b.slice:x:y"],
)
def test_a_cgroups_path_that_escapes_or_is_no_slice_is_refused(path: str) -> None:
    with pytest.raises(H.CgroupError):
        H.pod_cgroup(path)


def fake_proc(tmp: Path) -> tuple[Path, Path]:
    """A hybrid host: cpu, memory and cpuset v1 hierarchies, name=systemd, and cgroup2 at
    unified; this process's memory cgroup is not the root."""
    root = tmp / "cg"
    for name in ("cpu,cpuacct", "memory", "cpuset", "systemd", "unified"):
        (root / name).mkdir(parents=True)
    (root / "memory" / "jobs" / "7").mkdir(parents=True)
    (root / "cpuset" / "cpuset.cpus").write_text("0-1\n")
    (root / "cpuset" / "cpuset.mems").write_text("0\n")
    proc = tmp / "proc"
    proc.mkdir()
    (proc / "cgroup").write_text(
        "5:name=systemd:/\n4:memory:/jobs/7\n3:cpuset:/\n2:cpu,cpuacct:/\n0::/\n"
    )
    mounts = [
        f"30 25 0:26 / {root}/cpu,cpuacct rw - cgroup cgroup rw,relatime,cpu,cpuacct",
        f"31 25 0:27 / {root}/memory rw - cgroup cgroup rw,relatime,memory",
        f"32 25 0:28 / {root}/cpuset rw - cgroup cgroup rw,relatime,cpuset",
        f"33 25 0:29 / {root}/systemd rw - cgroup cgroup rw,relatime,name=systemd",
        f"34 25 0:30 / {root}/unified rw - cgroup2 cgroup2 rw,relatime",
        f"35 25 0:27 / {root}/memory-again rw - cgroup cgroup rw,relatime,memory",
        "36 25 0:31 / /proc rw - proc proc rw",
    ]
    (proc / "mountinfo").write_text("\n".join(mounts) + "\n")
    return root, proc


def test_every_hierarchy_once_with_this_process_cgroup_in_it(tmp_path: Path) -> None:
    root, proc = fake_proc(tmp_path)
    assert H.hierarchies(proc) == [
        (root / "cpu,cpuacct", "/"),
        (root / "memory", "/jobs/7"),
        (root / "cpuset", "/"),
        (root / "systemd", "/"),
        (root / "unified", "/"),
    ]


def test_make_creates_what_is_missing_and_says_so(tmp_path: Path) -> None:
    root, proc = fake_proc(tmp_path)
    (root / "memory" / "kubepods" / "pod1").mkdir(parents=True)  # the caller made this one
    hc = H.make("/kubepods/pod1/sbx", "sbx", proc)
    leaf = "kubepods/pod1/cocoon-sandbox-sbx"
    hiers = ["cpu,cpuacct", "memory", "cpuset", "systemd", "unified"]
    assert hc.join == [str(root / h / leaf) for h in hiers]
    assert all(Path(d).is_dir() for d in hc.join)
    assert hc.home[1] == str(root / "memory" / "jobs" / "7")
    # Parents first; the caller's pod cgroup in memory is not among them.
    assert str(root / "memory" / "kubepods" / "pod1") not in hc.made
    assert hc.made.index(str(root / "cpuset" / "kubepods")) < hc.made.index(
        str(root / "cpuset" / leaf)
    )
    assert str(root / "memory" / leaf) in hc.made
    # A new cpuset cgroup gets its parent's CPUs and nodes, or nothing could join it.
    assert (root / "cpuset" / leaf / "cpuset.cpus").read_text() == "0-1\n"


def test_remove_takes_away_only_what_make_made(tmp_path: Path) -> None:
    root, proc = fake_proc(tmp_path)
    (root / "memory" / "kubepods" / "pod1").mkdir(parents=True)
    hc = H.make("/kubepods/pod1/sbx", "sbx", proc)
    for d in hc.made:  # a fake cgroupfs: its files would stop rmdir
        for f in Path(d).glob("cpuset.*"):
            f.unlink()
    H.remove(hc)
    assert not any(Path(d).exists() for d in hc.made)
    assert (root / "memory" / "kubepods" / "pod1").is_dir()
    assert not (root / "cpu,cpuacct" / "kubepods").exists()


def test_remove_leaves_a_parent_another_sandbox_now_uses(tmp_path: Path) -> None:
    root, proc = fake_proc(tmp_path)
    first = H.make("/kubepods/podA/a", "a", proc)
    second = H.make("/kubepods/podB/b", "b", proc)
    assert str(root / "unified" / "kubepods") in first.made
    assert str(root / "unified" / "kubepods") not in second.made
    for hc in (first, second):
        for d in hc.made:
            for f in Path(d).glob("cpuset.*"):
                f.unlink()
    H.remove(first)
    assert (root / "unified" / "kubepods" / "podB" / "cocoon-sandbox-b").is_dir()
    H.remove(second)
    assert not (root / "unified" / "kubepods" / "podB").exists()


def test_no_cgroups_path_no_cgroup(tmp_path: Path) -> None:
    _, proc = fake_proc(tmp_path)
    assert H.make("", "sbx", proc) == HostCgroup()


def test_a_make_that_fails_half_way_leaves_nothing(tmp_path: Path) -> None:
    root, proc = fake_proc(tmp_path)
    (root / "systemd" / "kubepods").write_text("not a directory")
    with pytest.raises(H.CgroupError, match="host cgroup for sandbox sbx"):
        H.make("/kubepods/pod1/sbx", "sbx", proc)
    assert not (root / "memory" / "kubepods").exists()
    assert not (root / "cpu,cpuacct" / "kubepods").exists()


def test_join_writes_the_pid_into_every_hierarchy(tmp_path: Path) -> None:
    _, proc = fake_proc(tmp_path)
    hc = H.make("/k/p/s", "s", proc)
    H.join(hc, 4242)
    assert [Path(d, "cgroup.procs").read_text() for d in hc.join] == ["4242"] * len(hc.join)
    hc_bad = HostCgroup(join=[str(tmp_path / "gone")])
    with pytest.raises(H.CgroupError, match="joining host cgroup"):
        H.join(hc_bad, os.getpid())


def test_the_launch_file_carries_the_cgroup(tmp_path: Path) -> None:
    hc = HostCgroup(join=["/a"], home=["/"], made=["/a"])
    launch_spec(tmp_path, cgroup=hc).write(tmp_path / "launch.json")
    assert LaunchSpec.read(tmp_path / "launch.json").cgroup == hc


def test_leave_goes_to_the_nearest_home_that_is_left(tmp_path: Path) -> None:
    root, proc = fake_proc(tmp_path)
    hc = H.make("/k/p/s", "s", proc)
    gone = root / "memory" / "jobs" / "7" / "conmon-x"  # removed by its owner meanwhile
    hc = HostCgroup(hc.join, [*hc.home[:1], str(gone), *hc.home[2:]], hc.made)
    for home in {*hc.home, str(gone.parent)} - {str(gone)}:  # a cgroupfs has it in every one
        Path(home, "cgroup.procs").write_text("")
    H.leave(hc, 4242)
    assert (root / "memory" / "jobs" / "7" / "cgroup.procs").read_text() == "4242"
    assert not gone.exists()


def test_leave_moves_nothing_out_of_a_cgroup_it_did_not_make(tmp_path: Path) -> None:
    """A VM claimed into its claimer's own cgroup (``here``): its monitor stays in it, as
    nothing is removed (a move would be a cgroup migration for nothing)."""
    _, proc = fake_proc(tmp_path)
    hc = H.here(proc)
    for d in hc.join:
        Path(d, "cgroup.procs").write_text("")
    H.leave(hc, 4242)
    assert [Path(d, "cgroup.procs").read_text() for d in hc.join] == [""] * len(hc.join)
    assert all(Path(d).is_dir() for d in hc.join)


def test_remove_kills_what_is_left_in_the_sandbox_cgroup_only(tmp_path: Path) -> None:
    root, proc = fake_proc(tmp_path)
    (root / "memory" / "k" / "p").mkdir(parents=True)
    hc = H.make("/k/p/s", "s", proc)
    left = subprocess.Popen(["sleep", "60"])
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        Path(hc.join[1], "cgroup.procs").write_text(f"{left.pid}\n")
        # the pod cgroup is not the sandbox's: what is in it is never touched
        (root / "memory" / "k" / "p" / "cgroup.procs").write_text(f"{bystander.pid}\n")
        H.remove(hc, settle_s=0.2)
        assert left.wait(5) == -signal.SIGKILL
        assert bystander.poll() is None
    finally:
        for p in (left, bystander):
            p.kill()
            p.wait()
