"""The host's libc seam (runtime/libc.py) and what it lets us test without root: the sandbox
share's mounts (sandbox/hostmount.py) and network namespaces (network/netns.py)."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest

from cocoon.runtime import libc
from cocoon.runtime.errors import HostError, NetworkError
from cocoon.runtime.network import netns
from cocoon.runtime.sandbox import hostmount


class RecordingLibc:
    """Records every call (with the calling thread) and fails the ones named in ``fail``."""

    def __init__(self, fail: dict[str, int] | None = None) -> None:
        self.calls: list[tuple[str, tuple[object, ...], int]] = []
        self.fail = fail or {}

    def _do(self, name: str, *args: object) -> None:
        self.calls.append((name, args, threading.get_ident()))
        if name in self.fail:
            code = self.fail[name]
            raise OSError(code, os.strerror(code), name)

    def setns(self, fd: int, nstype: int) -> None:
        self._do("setns", fd, nstype)

    def unshare(self, flags: int) -> None:
        self._do("unshare", flags)

    def mount(
        self, source: str | None, target: str, fstype: str | None, flags: int, data: str | None
    ) -> None:
        self._do("mount", source, target, fstype, flags, data)

    def umount2(self, target: str, flags: int) -> None:
        self._do("umount2", target, flags)

    def names(self) -> list[str]:
        return [c[0] for c in self.calls]


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> RecordingLibc:
    f = RecordingLibc()
    monkeypatch.setattr(libc, "current", f)
    return f


def test_the_real_libc_reports_errno_as_oserror(tmp_path: Path) -> None:
    with pytest.raises(OSError) as info:  # not a mount point (or, unprivileged, not allowed)
        libc.CLibc().umount2(str(tmp_path), 0)
    assert info.value.errno in (errno.EINVAL, errno.EPERM)
    assert info.value.filename == str(tmp_path)


def test_bind_makes_the_mount_point_and_binds_recursively(
    fake: RecordingLibc, tmp_path: Path
) -> None:
    src_dir, src_file = tmp_path / "rootfs", tmp_path / "hosts"
    src_dir.mkdir()
    src_file.write_text("x")
    hostmount.bind(src_dir, tmp_path / "share" / "c1" / "rootfs")
    hostmount.bind(src_file, tmp_path / "share" / "c1" / "mounts" / "hosts")
    assert (tmp_path / "share/c1/rootfs").is_dir()
    assert (tmp_path / "share/c1/mounts/hosts").is_file()
    rec = libc.MS_BIND | libc.MS_REC
    assert [c[1] for c in fake.calls] == [
        (str(src_dir), str(tmp_path / "share/c1/rootfs"), None, rec, None),
        (str(src_file), str(tmp_path / "share/c1/mounts/hosts"), None, rec, None),
    ]


def test_make_shared_binds_the_directory_onto_itself_then_marks_it_shared(
    fake: RecordingLibc, tmp_path: Path
) -> None:
    d = tmp_path / "shared"
    hostmount.make_shared(d)
    assert [c[1] for c in fake.calls] == [
        (str(d), str(d), None, libc.MS_BIND, None),
        (None, str(d), None, libc.MS_SHARED, None),
    ]


def test_a_refused_mount_is_one_host_error_naming_both_paths(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(libc, "current", RecordingLibc({"mount": errno.EPERM}))
    with pytest.raises(HostError, match=rf"mount {tmp_path} on {tmp_path}/t: Operation not"):
        hostmount.bind(tmp_path, tmp_path / "t")


def test_unmount_all_detaches_deepest_first_and_fails_on_what_stays(
    fake: RecordingLibc, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    mounted = [f"{tmp_path}/a", f"{tmp_path}/a/b/c", f"{tmp_path}/a/b"]

    def mounts_under(d: Path) -> list[str]:
        return sorted(mounted, key=len, reverse=True)

    def umount2(target: str, flags: int) -> None:
        fake.calls.append(("umount2", (target, flags), 0))
        if not target.endswith("/b"):  # a/b is busy: it never goes
            mounted.remove(target)

    monkeypatch.setattr(hostmount, "mounts_under", mounts_under)
    monkeypatch.setattr(fake, "umount2", umount2)
    with pytest.raises(HostError, match=r"cannot unmount .*/a/b$"):
        hostmount.unmount_all(tmp_path)
    first = [c[1] for c in fake.calls[:3]]
    assert first == [
        (f"{tmp_path}/a/b/c", libc.MNT_DETACH),
        (f"{tmp_path}/a/b", libc.MNT_DETACH),
        (f"{tmp_path}/a", libc.MNT_DETACH),
    ]


def test_create_netns_unshares_in_a_thread_of_its_own_and_binds_it(
    fake: RecordingLibc, tmp_path: Path
) -> None:
    path = tmp_path / "netns" / "c1"
    netns.create_netns(path)
    assert fake.names() == ["unshare", "mount"]
    (_, (flags,), tid1), (_, margs, tid2) = fake.calls
    assert flags == libc.CLONE_NEWNET
    assert tid1 == tid2 != threading.get_ident(), "the caller's own thread changed namespace"
    src, target, fstype, mflags, _ = margs
    assert str(src).startswith("/proc/self/task/") and str(src).endswith("/ns/net")
    assert (target, fstype, mflags) == (str(path), None, libc.MS_BIND)
    assert path.exists()


def test_create_netns_that_fails_leaves_no_file(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(libc, "current", RecordingLibc({"unshare": errno.EPERM}))
    path = tmp_path / "c1"
    with pytest.raises(NetworkError, match=r"cannot create .*: unshare: Operation not permitted"):
        netns.create_netns(path)
    assert not path.exists()


def test_remove_netns_detaches_and_removes_even_when_not_mounted(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    f = RecordingLibc({"umount2": errno.EINVAL})
    monkeypatch.setattr(libc, "current", f)
    path = tmp_path / "c1"
    path.touch()
    netns.remove_netns(path)
    assert f.calls[0][:2] == ("umount2", (str(path), libc.MNT_DETACH))
    assert not path.exists()
    netns.remove_netns(path)  # gone already: nothing to do
    assert len(f.calls) == 1


def test_in_netns_runs_the_function_in_another_thread_after_setns(
    fake: RecordingLibc, tmp_path: Path
) -> None:
    path = tmp_path / "ns"
    path.touch()
    seen: list[int] = []

    def inside() -> int:
        seen.append(threading.get_ident())
        return 42

    assert netns.in_netns(str(path), inside) == 42
    (name, (fd, nstype), tid) = fake.calls[0]
    assert (name, nstype) == ("setns", libc.CLONE_NEWNET) and isinstance(fd, int)
    assert seen == [tid] and tid != threading.get_ident()
    with pytest.raises(OSError):
        os.fstat(fd)  # closed again


def test_in_netns_of_something_else_is_a_network_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(libc, "current", RecordingLibc({"setns": errno.EINVAL}))
    path = tmp_path / "ns"
    path.touch()
    with pytest.raises(NetworkError, match=r"network namespace .*/ns: not one \(Invalid argument"):
        netns.in_netns(str(path), lambda: None)
    with pytest.raises(NetworkError, match=r"/missing: No such file"):
        netns.in_netns(str(tmp_path / "missing"), lambda: None)


def test_an_exception_inside_the_namespace_reaches_the_caller(
    fake: RecordingLibc, tmp_path: Path
) -> None:
    path = tmp_path / "ns"
    path.touch()

    def boom() -> None:
        raise ValueError("inside")

    with pytest.raises(ValueError, match="inside"):
        netns.in_netns(str(path), boom)


def test_join_netns_moves_the_calling_thread(fake: RecordingLibc, tmp_path: Path) -> None:
    path = tmp_path / "ns"
    path.touch()
    libc.join_netns(str(path))
    assert fake.calls[0][0] == "setns" and fake.calls[0][1][1] == libc.CLONE_NEWNET
    assert fake.calls[0][2] == threading.get_ident()
