"""What the libc seam (cocoon.agent.libc) lets the host side test without root: the sandbox
share's mounts (sandbox/hostmount.py) and network namespaces (network/netns.py)."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from cocoon.agent import libc
from cocoon.runtime.errors import HostError, NetworkError
from cocoon.runtime.network import netns
from cocoon.runtime.sandbox import hostmount
from tests.unit.fakes import FakeLibc


def test_the_real_libc_reports_errno_as_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError) as info:  # not a mount point (or, unprivileged, not allowed)
        libc.CLibc().umount2(str(tmp_path), 0)
    assert info.value.errno in (errno.EINVAL, errno.EPERM)
    assert info.value.filename == str(tmp_path)


def test_bind_makes_the_mount_point_and_binds_recursively(fake: FakeLibc, tmp_path: Path) -> None:
    src_dir, src_file = tmp_path / "rootfs", tmp_path / "hosts"
    src_dir.mkdir()
    src_file.write_text("x")
    hostmount.bind(src_dir, tmp_path / "share" / "c1" / "rootfs")
    hostmount.bind(src_file, tmp_path / "share" / "c1" / "mounts" / "hosts")
    assert (tmp_path / "share/c1/rootfs").is_dir()
    assert (tmp_path / "share/c1/mounts/hosts").is_file()
    rec = libc.MS_BIND | libc.MS_REC
    assert [c.args for c in fake.calls] == [
        (str(src_dir), str(tmp_path / "share/c1/rootfs"), None, rec, None),
        (str(src_file), str(tmp_path / "share/c1/mounts/hosts"), None, rec, None),
    ]


def test_make_shared_binds_the_directory_onto_itself_then_marks_it_shared(
    fake: FakeLibc, tmp_path: Path
) -> None:
    d = tmp_path / "shared"
    hostmount.make_shared(d)
    assert [c.args for c in fake.calls] == [
        (str(d), str(d), None, libc.MS_BIND, None),
        (None, str(d), None, libc.MS_SHARED, None),
    ]


def test_a_refused_mount_is_one_host_error_naming_both_paths(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(libc, "current", FakeLibc(fail={"mount": errno.EPERM}))
    with pytest.raises(HostError, match=rf"mount {tmp_path} on {tmp_path}/t: Operation not"):
        hostmount.bind(tmp_path, tmp_path / "t")


def test_unmount_all_detaches_deepest_first_and_fails_on_what_stays(
    fake: FakeLibc, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    mounted = [f"{tmp_path}/a", f"{tmp_path}/a/b/c", f"{tmp_path}/a/b"]

    def mounts_under(d: Path) -> list[str]:
        return sorted(mounted, key=len, reverse=True)

    real = fake.umount2

    def umount2(target: str, flags: int) -> None:
        real(target, flags)
        if not target.endswith("/b"):  # a/b is busy: it never goes
            mounted.remove(target)

    monkeypatch.setattr(hostmount, "mounts_under", mounts_under)
    monkeypatch.setattr(fake, "umount2", umount2)
    with pytest.raises(HostError, match=r"cannot unmount .*/a/b$"):
        hostmount.unmount_all(tmp_path)
    first = [c.args for c in fake.calls[:3]]
    assert first == [
        (f"{tmp_path}/a/b/c", libc.MNT_DETACH),
        (f"{tmp_path}/a/b", libc.MNT_DETACH),
        (f"{tmp_path}/a", libc.MNT_DETACH),
    ]


def test_create_netns_unshares_in_a_thread_of_its_own_and_binds_it(
    fake: FakeLibc, tmp_path: Path
) -> None:
    path = tmp_path / "netns" / "c1"
    netns.create_netns(path)
    assert [c.name for c in fake.calls] == ["unshare", "mount"]
    unshare, mount = fake.calls
    assert unshare.args == (libc.CLONE_NEWNET,)
    assert unshare.thread_id == mount.thread_id != threading.get_ident(), (
        "the caller's own thread changed namespace"
    )
    src, target, fstype, mflags, _ = mount.args
    assert str(src).startswith("/proc/self/task/") and str(src).endswith("/ns/net")
    assert (target, fstype, mflags) == (str(path), None, libc.MS_BIND)
    assert path.exists()


def test_create_netns_that_fails_leaves_no_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(libc, "current", FakeLibc(fail={"unshare": errno.EPERM}))
    path = tmp_path / "c1"
    with pytest.raises(NetworkError, match=r"cannot create .*: unshare: Operation not permitted"):
        netns.create_netns(path)
    assert not path.exists()


def test_remove_netns_detaches_and_removes_even_when_not_mounted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    f = FakeLibc(fail={"umount2": errno.EINVAL})
    monkeypatch.setattr(libc, "current", f)
    path = tmp_path / "c1"
    path.touch()
    netns.remove_netns(path)
    assert (f.calls[0].name, f.calls[0].args) == ("umount2", (str(path), libc.MNT_DETACH))
    assert not path.exists()
    netns.remove_netns(path)  # gone already: nothing to do
    assert len(f.calls) == 1


def test_in_netns_runs_the_function_in_another_thread_after_setns(
    fake: FakeLibc, tmp_path: Path
) -> None:
    path = tmp_path / "ns"
    path.touch()
    seen: list[int] = []

    def inside() -> int:
        seen.append(threading.get_ident())
        return 42

    assert netns.in_netns(str(path), inside) == 42
    [call] = fake.calls
    fd, nstype = call.args
    assert isinstance(fd, int)
    assert (call.name, nstype, call.fd_target) == ("setns", libc.CLONE_NEWNET, str(path))
    assert seen == [call.thread_id] and call.thread_id != threading.get_ident()
    with pytest.raises(OSError):
        os.fstat(fd)  # closed again


def test_in_netns_of_something_else_is_a_network_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(libc, "current", FakeLibc(fail={"setns": errno.EINVAL}))
    path = tmp_path / "ns"
    path.touch()
    with pytest.raises(NetworkError, match=r"network namespace .*/ns: not one \(Invalid argument"):
        netns.in_netns(str(path), lambda: None)
    with pytest.raises(NetworkError, match=r"/missing: No such file"):
        netns.in_netns(str(tmp_path / "missing"), lambda: None)


def test_an_exception_inside_the_namespace_reaches_the_caller(
    fake: FakeLibc, tmp_path: Path
) -> None:
    path = tmp_path / "ns"
    path.touch()

    def boom() -> None:
        raise ValueError("inside")

    with pytest.raises(ValueError, match="inside"):
        netns.in_netns(str(path), boom)


def test_join_netns_moves_the_calling_thread(fake: FakeLibc, tmp_path: Path) -> None:
    path = tmp_path / "ns"
    path.touch()
    libc.join_netns(str(path))
    [call] = fake.calls
    assert (call.name, call.args[1], call.fd_target) == ("setns", libc.CLONE_NEWNET, str(path))
    assert call.thread_id == threading.get_ident()
