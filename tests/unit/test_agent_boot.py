"""The agent's start without a VM: its flags (no argparse) and the kernel modules it loads
once it serves (agent.kmod), against the recording libc fake."""

from __future__ import annotations

import errno
import os
import threading
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
    return kmod.LateModules(
        listing, d, after=lambda: AFTER.append(len(getattr(libc.current, "calls", ())))
    )


AFTER: list[int] = []  # how many libc calls had been made when each LateModules' ``after`` ran


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
    assert AFTER[-1] == len(names)  # the reporting order is set again after every module


def reporting_files(tmp_path: Path, cmdline: str, current: str | None) -> tuple[Path, ...]:
    (tmp_path / "cmdline").write_text(cmdline + "\n")
    param = tmp_path / "page_reporting_order"
    if current is not None:
        param.write_text(current + "\n")
    return tmp_path / "cmdline", param, tmp_path / "compact_memory"


def test_the_reporting_order_asked_for_is_set_again_and_memory_compacted(tmp_path: Path) -> None:
    cmdline, param, compact = reporting_files(
        tmp_path,
        "quiet page_reporting.page_reporting_order=5 page_reporting.page_reporting_order=3",
        "9",
    )
    assert kmod.reapply_reporting_order(cmdline, param, compact) == 3  # the last one wins
    assert param.read_text() == "3" and compact.read_text() == "1"


@pytest.mark.parametrize(
    ("cmdline", "current"),
    [
        ("quiet", "9"),  # not asked for
        ("page_reporting.page_reporting_order=x5", "9"),  # not a number
        ("page_reporting.page_reporting_order=5", None),  # no balloon driver: no parameter
        ("page_reporting.page_reporting_order=5", "5"),  # already so: no compaction
    ],
)
def test_the_reporting_order_is_left_alone(
    tmp_path: Path, cmdline: str, current: str | None
) -> None:
    files = reporting_files(tmp_path, cmdline, current)
    want = 5 if current == "5" else None
    assert kmod.reapply_reporting_order(*files) == want
    assert not files[2].exists()
    assert (files[1].read_text() if current else None) == (current + "\n" if current else None)


def test_a_kernel_that_refuses_the_order_is_logged_not_fatal(tmp_path: Path) -> None:
    cmdline, _, compact = reporting_files(tmp_path, "page_reporting.page_reporting_order=5", None)
    refused = tmp_path / "refused"
    refused.mkdir()  # reading or writing it fails (EISDIR), as the kernel's EINVAL would
    assert kmod.reapply_reporting_order(cmdline, refused, compact) is None
    assert not compact.exists()


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


def test_late_modules_load_at_low_priority_in_their_own_thread_only(tmp_path: Path) -> None:
    seen: list[int] = []
    m = kmod.LateModules(
        tmp_path / "none.list",
        tmp_path,
        after=lambda: seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id())),
    )
    m.start()
    m.wait(timeout=5)
    assert seen == [kmod.LOAD_NICE]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) < kmod.LOAD_NICE


def test_no_late_modules_list_means_nothing_to_wait_for(tmp_path: Path) -> None:
    m = kmod.LateModules(tmp_path / "none.list", tmp_path, after=lambda: None)
    m.start()
    m.wait(timeout=5)
