"""The agent's start without a VM: its flags (no argparse) and the kernel modules it loads
once it serves (agent.kmod), against the recording libc fake."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from cocoon.agent import kmod, libc, pid1
from tests.unit.fakes import FakeLibc


@pytest.mark.parametrize(
    "argv, params, want",
    [
        ([], {}, pid1.Args()),
        ([], {"debug": "1"}, pid1.Args(debug=True)),
        (["--debug"], {}, pid1.Args(debug=True)),
        (
            ["--socket", "/x.sock", "--port=/dev/vport1p1"],
            {},
            pid1.Args("/x.sock", "/dev/vport1p1"),
        ),
        (["--socket=/y"], {"debug": "0"}, pid1.Args(socket="/y")),
    ],
)
def test_agent_flags(argv: list[str], params: dict[str, str], want: pid1.Args) -> None:
    assert pid1.parse_args(argv, params) == want


@pytest.mark.parametrize("argv", [["--socket"], ["--port="], ["--nosuch"], ["--debug=1"], ["x"]])
def test_bad_agent_flags_are_one_line(argv: list[str]) -> None:
    with pytest.raises(SystemExit, match="cocoon-agent: "):
        pid1.parse_args(argv, {})


def late(tmp_path: Path, names: list[str], present: list[str]) -> kmod.LateModules:
    d = tmp_path / "modules"
    d.mkdir()
    for n in present:
        (d / n).write_bytes(b"\x7fELF")
    listing = tmp_path / "late-modules.list"
    listing.write_text("\n".join(names) + "\n")
    return kmod.LateModules(listing, d)


def test_late_modules_load_in_order_and_calls_wait_for_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeLibc()
    monkeypatch.setattr(libc, "current", fake)
    names = ["scsi_mod.ko", "virtio_scsi.ko", "fuse.ko", "virtiofs.ko"]
    m = late(tmp_path, names, names)
    with pytest.raises(OSError, match="still loading"):
        m.wait(timeout=0.01)  # not started: nothing is in yet
    m.start()
    m.wait(timeout=5)
    loaded = [c.args[0] for c in fake.calls if c.name == "finit_module"]
    assert loaded == [str(tmp_path / "modules" / n) for n in names]
    assert not m.failed


def test_a_module_that_does_not_load_fails_the_calls_that_need_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeLibc()
    monkeypatch.setattr(libc, "current", fake)
    m = late(tmp_path, ["a.ko", "missing.ko", "b.ko"], ["a.ko", "b.ko"])
    m.start()
    with pytest.raises(OSError, match=r"failed to load: missing\.ko"):
        m.wait(timeout=5)
    assert [Path(str(c.args[0])).name for c in fake.calls] == ["a.ko", "b.ko"]  # the rest load


def test_a_module_already_in_the_kernel_is_fine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeLibc(fail={"finit_module": errno.EEXIST})
    monkeypatch.setattr(libc, "current", fake)
    m = late(tmp_path, ["a.ko"], ["a.ko"])
    m.start()
    m.wait(timeout=5)


def test_no_late_modules_list_means_nothing_to_wait_for(tmp_path: Path) -> None:
    m = kmod.LateModules(tmp_path / "none.list", tmp_path)
    m.start()
    m.wait(timeout=5)
