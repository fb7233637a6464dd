"""Fixtures for tests that boot real guests: a private state root, the default configuration
with no host files read, and a leak check after every test (processes, sockets, state dirs,
host cgroups). On failure the sandbox's console and logs are attached to the report."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import Any

import pytest

from cocoon.runtime import config as config_mod
from cocoon.runtime.monitor import qemuuser
from cocoon.runtime.sandbox import launcher as sandbox
from cocoon.testing.harness import vm_logs
from cocoon.testing.leaks import mounts_under, processes_left, sandbox_cgroups
from tests.integration.cli import Cli


@pytest.fixture
def state_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    root = tmp_path_factory.mktemp("root")
    marked = uid_markers()
    clones = clone_memory()
    yield root
    # Leak check: nothing of this root may survive the test.
    leaked = processes_left(str(root))
    left = [
        str(p)
        for sub, pattern in (
            ("sandboxes", "*"),
            ("containers", "*"),
            ("netns", "*"),
            ("pool", "p-*"),
            ("template", "b-*"),  # a template build's VM
            ("template", "*.new"),  # a template half saved
        )
        for p in sorted((root / sub).glob(pattern))
    ]
    assert not leaked, f"processes left behind: {leaked}"
    assert not left, f"state left behind: {left}"
    assert not mounts_under(root), f"mounts left behind: {mounts_under(root)}"
    assert not sandbox_cgroups(), f"host cgroups left behind: {sandbox_cgroups()}"
    left_marked = sorted(set(uid_markers().items()) - set(marked.items()))
    assert not left_marked, f"non-root QEMU uids left marked (uid, holder): {left_marked}"
    left_clones = sorted(clone_memory() - clones)
    assert not left_clones, f"restored VMs' RAM copies left behind: {left_clones}"


LOG_TAIL = 60


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A failing test's report carries the tails of each of its sandboxes' console, agent and
    monitor logs (harness.vm_logs, as the plugin's reports), read before teardown removes
    them."""
    report = yield
    root = getattr(item, "funcargs", {}).get("state_root")
    if report.failed and call.when == "call" and isinstance(root, Path):
        for link in sorted((root / "sandboxes").glob("*")):
            for kind, text in vm_logs(link.resolve(), LOG_TAIL).items():
                if text.strip():
                    report.sections.append((f"sandbox {link.name} {kind}", text))
    return report


def clone_memory() -> set[str]:
    """Copies of a template's RAM made for restored VMs (sandbox.launcher.clone_memory_file)."""
    return {str(p) for p in sandbox.CLONE_MEMORY_DIR.glob("cocoon-*.mem")}


def uid_markers() -> dict[str, str]:
    """The non-root QEMU uids marked as taken, and by whom (monitor.qemuuser)."""
    out = {}
    for p in qemuuser.UID_DIR.glob("[0-9]*"):
        with contextlib.suppress(OSError):
            out[p.name] = p.read_text()
    return out


@pytest.fixture
def cfg() -> config_mod.Config:
    """The shipped defaults (equal to configuration.toml), independent of /etc/cocoon."""
    return config_mod.Config()


@contextlib.contextmanager
def grpc_stubs(d: Path) -> Iterator[tuple[Any, Any]]:
    """The agent's and the VM service's gRPC stubs on the monitor's own socket (which the
    CLI does not use: it calls as JSON, sandbox.client), for the streaming methods."""
    import grpc

    from cocoon.agent import agent_pb2_grpc
    from cocoon.runtime import vm_pb2_grpc

    with grpc.insecure_channel(f"unix:{d / 'monitor.sock'}") as ch:
        yield agent_pb2_grpc.AgentServiceStub(ch), vm_pb2_grpc.VMStub(ch)


def with_(cfg: config_mod.Config, section: str, **kw: object) -> config_mod.Config:
    return dataclasses.replace(cfg, **{section: dataclasses.replace(getattr(cfg, section), **kw)})


@pytest.fixture
def image(cfg: config_mod.Config) -> sandbox.GuestFiles:
    return sandbox.guest_files(cfg)


@pytest.fixture
def cli(state_root: Path, tmp_path: Path) -> Iterator[Cli]:
    """The CLI on the test's state root; containers left at the end fail the test."""
    c = Cli(state_root, tmp_path)
    yield c
    left = c.ok("list", "-q").split()
    for cid in left:
        c("delete", "--force", cid)
    assert not left, f"containers left: {left}"
