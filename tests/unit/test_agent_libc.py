"""The agent's libc seam (cocoon.agent.libc) and the agent code that goes through it.

A recording fake (tests/unit/fakes.py) stands in for libc through ``libc.current``, so
none of this needs root.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from cocoon.agent import libc, mounts, network, pid1
from tests.unit.fakes import FakeLibc

AGENT_DIR = Path(libc.__file__).parent


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


# ------------------------------------------------------------------ the module-level calls


def test_calls_go_through_current_with_their_defaults(fake: FakeLibc) -> None:
    libc.setns(7, libc.CLONE_NEWNET)
    libc.unshare(libc.CLONE_NEWNS)
    libc.mount("cocoon", "/run/x", "virtiofs", libc.MS_NODEV)
    libc.mount("/a", "/b", flags=libc.MS_BIND | libc.MS_REC)
    libc.umount2("/run/x")
    libc.umount2("/run/y", libc.MNT_DETACH)
    libc.reboot(libc.RB_POWER_OFF)
    assert [(c.name, c.args) for c in fake.calls] == [
        ("setns", (7, 0x40000000)),
        ("unshare", (0x00020000,)),
        ("mount", ("cocoon", "/run/x", "virtiofs", 0x4, None)),
        ("mount", ("/a", "/b", None, 0x1000 | 0x4000, None)),
        ("umount2", ("/run/x", 0)),
        ("umount2", ("/run/y", 2)),
        ("reboot", (0x4321FEDC,)),
    ]


def test_real_libc_failures_are_oserrors_with_the_errno() -> None:
    real = libc.CLibc()
    with pytest.raises(OSError) as ei:
        real.setns(-1, libc.CLONE_NEWNET)
    assert ei.value.errno == errno.EBADF
    assert ei.value.strerror == os.strerror(errno.EBADF)
    assert ei.value.filename == "setns(-1)"


def test_real_umount_of_a_plain_directory_fails_naming_it(tmp_path: Path) -> None:
    # EINVAL as root (not a mount point), EPERM otherwise: an OSError naming the target.
    with pytest.raises(OSError) as ei:
        libc.CLibc().umount2(str(tmp_path), 0)
    assert ei.value.errno in (errno.EINVAL, errno.EPERM)
    assert ei.value.filename == str(tmp_path)


# ------------------------------------------------------------------ join_netns, in_thread


def test_join_netns_opens_the_path_and_passes_clone_newnet(fake: FakeLibc, tmp_path: Path) -> None:
    ns = tmp_path / "netns"
    ns.write_text("")
    fds_before = set(os.listdir("/proc/self/fd"))
    libc.join_netns(str(ns))
    [call] = fake.calls
    assert call.name == "setns"
    fd, nstype = call.args
    assert nstype == libc.CLONE_NEWNET
    assert call.fd_target == str(ns)
    assert isinstance(fd, int) and not fd_is_open(fd)  # closed again
    assert set(os.listdir("/proc/self/fd")) == fds_before


def test_join_netns_failure_names_the_path_and_closes_the_fd(
    fake: FakeLibc, tmp_path: Path
) -> None:
    ns = tmp_path / "netns"
    ns.write_text("")
    fake.fail["setns"] = errno.EPERM
    with pytest.raises(OSError) as ei:
        libc.join_netns(str(ns))
    assert ei.value.errno == errno.EPERM
    assert ei.value.filename == str(ns)
    fd = fake.calls[0].args[0]
    assert isinstance(fd, int) and not fd_is_open(fd)


def test_join_netns_of_a_missing_path_never_calls_setns(fake: FakeLibc, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as ei:
        libc.join_netns(str(tmp_path / "gone"))
    assert ei.value.filename == str(tmp_path / "gone")
    assert fake.calls == []


def test_in_thread_runs_elsewhere_and_returns_or_raises() -> None:
    names: list[str] = []

    def ok() -> int:
        names.append(threading.current_thread().name)
        return 42

    assert libc.in_thread(ok, "probe") == 42
    assert names == ["probe"]
    assert threading.current_thread().name != "probe"

    def boom() -> int:
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        libc.in_thread(boom, "probe")


# ------------------------------------------------------------------ the agent's callers


def test_loopback_up_in_joins_the_pids_netns_in_its_own_thread(
    fake: FakeLibc, monkeypatch: pytest.MonkeyPatch
) -> None:
    ups: list[tuple[str, int]] = []

    def loopback_up(self: network.Network) -> None:
        ups.append((threading.current_thread().name, len(fake.calls)))

    monkeypatch.setattr(network.Network, "loopback_up", loopback_up)
    network.loopback_up_in(os.getpid())
    [call] = fake.calls
    assert call.args[1] == libc.CLONE_NEWNET
    assert call.fd_target == os.readlink(f"/proc/{os.getpid()}/ns/net")
    assert call.thread == "netns-lo"
    assert ups == [("netns-lo", 1)]  # after the join, in the same (not the caller's) thread


def test_loopback_up_in_stops_when_the_join_fails(
    fake: FakeLibc, monkeypatch: pytest.MonkeyPatch
) -> None:
    ups: list[int] = []
    monkeypatch.setattr(network.Network, "loopback_up", lambda self: ups.append(1))
    fake.fail["setns"] = errno.EPERM
    with pytest.raises(OSError) as ei:
        network.loopback_up_in(os.getpid())
    assert ei.value.errno == errno.EPERM
    assert ei.value.filename == f"/proc/{os.getpid()}/ns/net"
    assert ups == []


def test_mounts_mount_makes_the_target_and_calls_mount(fake: FakeLibc, tmp_path: Path) -> None:
    target = tmp_path / "a" / "shared"
    mounts.mount("cocoon", str(target), "virtiofs", libc.MS_NODEV)
    assert target.is_dir()
    assert [(c.name, c.args) for c in fake.calls] == [
        ("mount", ("cocoon", str(target), "virtiofs", libc.MS_NODEV, None))
    ]
    mounts.mount("/dev/sdb", str(target), "ext4", data="ro")
    assert fake.calls[-1].args == ("/dev/sdb", str(target), "ext4", 0, "ro")


def test_mounts_mount_failure_says_what_was_mounted(fake: FakeLibc, tmp_path: Path) -> None:
    fake.fail["mount"] = errno.ENODEV
    with pytest.raises(OSError) as ei:
        mounts.mount("cocoon", str(tmp_path / "s"), "virtiofs")
    assert ei.value.errno == errno.ENODEV
    assert str(ei.value) == (
        f"[Errno {errno.ENODEV}] mount virtiofs cocoon on {tmp_path / 's'}: "
        f"{os.strerror(errno.ENODEV)}"
    )


class Exited(Exception):
    pass


@pytest.mark.parametrize("fails", [False, True])
def test_power_off_reboots_through_the_seam(
    fake: FakeLibc, monkeypatch: pytest.MonkeyPatch, fails: bool
) -> None:
    def exit_(code: int) -> None:
        raise Exited(code)

    monkeypatch.setattr(os, "getpid", lambda: 1)
    monkeypatch.setattr(os, "sync", lambda: None)
    monkeypatch.setattr(os, "_exit", exit_)
    if fails:
        fake.fail["reboot"] = errno.EPERM
    with pytest.raises(Exited) as ei:
        pid1.power_off()
    assert ei.value.args == (1,)  # reboot(2) returned: whether it failed or not, exit 1
    assert [(c.name, c.args) for c in fake.calls] == [("reboot", (libc.RB_POWER_OFF,))]


def test_libc_is_the_only_ctypes_site_in_the_agent() -> None:
    users = sorted(p.name for p in AGENT_DIR.glob("*.py") if "ctypes" in p.read_text())
    assert users == ["libc.py"]


def test_propagation_wanted_from_mount_options() -> None:
    from cocoon.agent import libc as alibc
    from cocoon.agent import mounts

    spec = {
        "mounts": [
            {"destination": "/a", "options": ["rbind", "rshared"]},
            {"destination": "/b", "options": ["bind", "ro"]},
            {"destination": "/c", "options": ["slave"]},
            "junk",
            {"destination": "/d", "options": None},
        ]
    }
    assert mounts.propagation_wanted(spec) == [
        ("/a", alibc.MS_SHARED | alibc.MS_REC),
        ("/c", alibc.MS_SLAVE),
    ]
    assert mounts.propagation_wanted({}) == []
