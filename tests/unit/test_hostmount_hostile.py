"""The host's mounts in a sandbox share while a hostile guest changes it (docs/security.md).

Everything below ``shared/`` is the guest's to write through virtiofsd while the VM runs: a
root process in the guest can put a symlink where the host is about to make a mount point (a
container joining a pod) or remove one (a container leaving it). Here the "guest" is this test
changing the share directly, with real mounts (root needed): no symlink below the share is
followed, by a bind, an unmount or a remove, and a victim directory outside it stays as it was.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from cocoon.runtime.errors import HostError
from cocoon.runtime.sandbox import hostmount

pytestmark = [
    pytest.mark.root,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root (real bind mounts)"),
]


def mounted(p: Path) -> bool:
    return str(p) in hostmount._mount_points()


@pytest.fixture
def sb(tmp_path: Path) -> Iterator[Path]:
    """A sandbox dir whose ``shared/`` is made as the launcher makes it (bound onto itself)."""
    d = tmp_path / "sb"
    d.mkdir()
    hostmount.make_shared(d / "shared")
    try:
        yield d
    finally:
        hostmount.unmount_all(tmp_path)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A host directory outside the share with a file the guest wants."""
    v = tmp_path / "victim"
    v.mkdir()
    (v / "passwd").write_text("root:x:0:0\n")
    return v


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    r = tmp_path / "rootfs"
    (r / "bin").mkdir(parents=True)
    (r / "bin" / "sh").write_text("sh")
    return r


def test_the_share_is_found_and_nothing_above_it_counts(sb: Path, tmp_path: Path) -> None:
    share = sb / "shared"
    assert hostmount.share_root(share / "c1" / "rootfs") == share
    assert hostmount.share_root(share / "shared" / "x") == share  # a container named shared
    assert hostmount.share_root(share) is None
    assert hostmount.share_root(tmp_path / "elsewhere" / "shared" / "x") is None  # not a mount


def test_a_normal_bind_and_remove_still_work(sb: Path, rootfs: Path, tmp_path: Path) -> None:
    hosts = tmp_path / "hosts"
    hosts.write_text("127.0.0.1 localhost\n")
    base = sb / "shared" / "c1"
    hostmount.bind(rootfs, base / "rootfs")
    hostmount.bind(hosts, base / "mounts" / "0-hosts")
    assert (base / "rootfs" / "bin" / "sh").read_text() == "sh"
    assert (base / "mounts" / "0-hosts").read_text() == hosts.read_text()
    assert mounted(base / "rootfs") and mounted(base / "mounts" / "0-hosts")
    hostmount.safe_rmtree(base)
    assert not base.exists() and not os.path.lexists(base)
    assert (rootfs / "bin" / "sh").read_text() == "sh"  # never deleted through the share
    assert hosts.exists()


@pytest.mark.parametrize("where", ["c2", "c2/mounts"])
def test_a_planted_directory_symlink_is_not_followed_by_bind(
    sb: Path, victim: Path, rootfs: Path, where: str
) -> None:
    link = sb / "shared" / where
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(victim)  # the guest, before the host binds a joining container
    target = sb / "shared" / "c2" / ("rootfs" if where == "c2" else "mounts/0-vol")
    with pytest.raises(HostError, match="not a directory below the share"):
        hostmount.bind(rootfs, target)
    assert sorted(os.listdir(victim)) == ["passwd"]
    assert not hostmount.mounts_under(victim)


def test_a_planted_file_symlink_is_not_mounted_over(sb: Path, victim: Path, tmp_path: Path) -> None:
    mounts = sb / "shared" / "c3" / "mounts"
    mounts.mkdir(parents=True)
    (mounts / "0-hosts").symlink_to(victim / "passwd")
    src = tmp_path / "hosts"
    src.write_text("guest-controlled\n")
    with pytest.raises(HostError, match=r"not a regular file .*symlink"):
        hostmount.bind(src, mounts / "0-hosts")
    assert (victim / "passwd").read_text() == "root:x:0:0\n"
    assert not mounted(victim / "passwd")


def test_a_planted_fifo_does_not_hang_the_host(sb: Path, tmp_path: Path) -> None:
    mounts = sb / "shared" / "c4" / "mounts"
    mounts.mkdir(parents=True)
    os.mkfifo(mounts / "0-hosts")
    src = tmp_path / "hosts"
    src.write_text("x\n")
    with pytest.raises(HostError, match=r"not a regular file .*special file"):
        hostmount.bind(src, mounts / "0-hosts")


def test_a_container_dir_swapped_for_a_symlink_unmounts_nothing_of_the_host(
    sb: Path, victim: Path, rootfs: Path
) -> None:
    """A pod member leaving: the guest renamed its share dir away and left a symlink to a
    host directory with a mount in its place; the host's remove must not unmount or delete
    anything there."""
    (victim / "mnt").mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "victim", str(victim / "mnt")], check=True)
    try:
        (victim / "mnt" / "data").write_text("keep\n")
        share = sb / "shared"
        hostmount.bind(rootfs, share / "c5" / "rootfs")
        (share / "c5").rename(share / "moved")  # the guest (rename of a non-mount-point dir)
        (share / "c5").symlink_to(victim)
        hostmount.safe_rmtree(share / "c5")
        assert not os.path.lexists(share / "c5")  # the symlink went, not what it names
        assert mounted(victim / "mnt")
        assert (victim / "mnt" / "data").read_text() == "keep\n"
        assert (victim / "passwd").exists()
        assert mounted(share / "moved" / "rootfs")  # ours, gone with the sandbox dir
        hostmount.safe_rmtree(sb)
        assert not sb.exists() and (rootfs / "bin" / "sh").exists()
    finally:
        subprocess.run(["umount", "-l", str(victim / "mnt")], check=False)


def test_symlinks_inside_a_removed_dir_are_removed_not_followed(
    sb: Path, victim: Path, rootfs: Path
) -> None:
    base = sb / "shared" / "c6"
    hostmount.bind(rootfs, base / "rootfs")
    (base / "evil").symlink_to(victim)
    (base / "deeper").mkdir()
    (base / "deeper" / "evil").symlink_to(victim / "passwd")
    hostmount.safe_rmtree(base)
    assert not os.path.lexists(base)
    assert sorted(os.listdir(victim)) == ["passwd"]


def test_a_guest_made_deep_tree_is_an_error_not_a_crash(sb: Path) -> None:
    d = sb / "shared" / "c7"
    p = d
    for _ in range(hostmount.MAX_DEPTH + 3):
        p = p / "d"
    p.mkdir(parents=True)
    with pytest.raises(HostError, match="nested deeper than"):
        hostmount.safe_rmtree(d)
