"""The exec verb's checks before its shim starts (runtime/container/execproc.py): a process
too large for the monitor's endpoint, a sandbox that is gone and a bad process are one clear
error each, and leave no shim behind. The exec itself, against a fake agent, is in
test_shim_stdio.py; with real guests in tests/integration."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cocoon.runtime.config import Config
from cocoon.runtime.container import execproc
from cocoon.runtime.container.state import ContainerState, Ctx
from cocoon.runtime.errors import CocoonError
from cocoon.runtime.monitor import launch as L
from cocoon.runtime.pids import start_time
from cocoon.testing.leaks import processes_mentioning


def running(tmp_path: Path) -> Ctx:
    """A container whose recorded pid (ours) is alive: its status reads running."""
    ctx = Ctx(Config(), tmp_path / "root")
    ctx.store.reserve("c1")
    me = os.getpid()
    st = ContainerState("c1", str(tmp_path), "", "c1", "running", me, pid_start=start_time(me))
    ctx.store.save(st)
    return ctx


@pytest.mark.parametrize(
    ("process", "words"),
    [
        (
            {"args": ["true"], "cwd": "/", "env": ["A=" + "x" * L.EXEC_MAX]},
            "bytes of JSON, at most",
        ),
        ({"args": ["true"], "cwd": "/"}, "container c1: its sandbox is not running"),
        ({"args": [], "cwd": "/"}, "args"),
    ],
)
def test_an_exec_refused_before_its_shim_is_one_clear_error(
    tmp_path: Path, process: dict[str, object], words: str
) -> None:
    ctx = running(tmp_path)
    with pytest.raises(CocoonError, match=words):
        execproc.exec_process(ctx, "c1", process, False, tmp_path / "pid", None)
    assert not (tmp_path / "pid").exists()
    assert ctx.store.load("c1").exec_pids == {}
    assert not processes_mentioning(str(ctx.root))
