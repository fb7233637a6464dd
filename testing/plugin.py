"""cocoon's pytest plugin (the ``pytest11`` entry point ``cocoon``): VM-isolated containers as
fixtures for a test suite's own integration tests.

Fixtures: ``cocoon`` (function scope), ``cocoon_module``, ``cocoon_session``, each a
``harness.Cocoon`` whose containers, pods and networks go when the scope ends; and
``cocoon_runtime``, the session's one private state root (one per xdist worker). On a host
without root, QEMU or a guest image, every test using them is skipped with the reason and the
command that fixes it.

Options: ``--cocoon-keep`` (a failing test's sandboxes stay up; the report says how to exec
into them), ``--cocoon-pool N`` (N pre-booted VMs: a container costs a warm start),
``--cocoon-template`` (VMs restored from a saved one), ``--cocoon-config FILE``,
``--cocoon-debug``.

On a failing test the report carries, per container, the workload's stdout and stderr, the
VM's console, the agent's log and the monitor's log. Teardown always runs and fails the test
whose containers left anything on the host.

May import: the standard library, pytest, cocoon.runtime.{config, errors,
sandbox.hostcheck}, cocoon.testing.{harness, leaks} (lazily: fixtures only).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from cocoon.testing.harness import Cocoon, Runtime

FAILED = pytest.StashKey[bool]()
KEPT = pytest.StashKey[list[str]]()
REMOVE_HINT = pytest.StashKey[str]()
FIX = "`cocoon check` lists what this host lacks"
RUN_DIR = Path("/run/cocoon-pytest")  # the sessions' state roots


def pytest_addoption(parser: pytest.Parser) -> None:
    g = parser.getgroup("cocoon", "VM-isolated containers as fixtures (cocoon)")
    g.addoption(
        "--cocoon-keep",
        action="store_true",
        help="leave a failing test's sandboxes up and print how to exec into them",
    )
    g.addoption(
        "--cocoon-pool",
        type=int,
        default=0,
        metavar="N",
        help="keep N pre-booted VMs, so a container costs a warm start, not a boot",
    )
    g.addoption(
        "--cocoon-template",
        action="store_true",
        help="restore VMs from a saved one instead of booting them ([factory] template)",
    )
    g.addoption("--cocoon-config", default="", metavar="FILE", help="a cocoon configuration")
    g.addoption("--cocoon-debug", action="store_true", help="cocoon --debug for every call")


def pytest_configure(config: pytest.Config) -> None:
    config.stash[KEPT] = []
    if config.getoption("cocoon_pool", 0) < 0:
        raise pytest.UsageError("--cocoon-pool: a number of VMs, 0 or more")


def _missing(cfg: Any) -> str:
    """Why this host cannot run cocoon's sandboxes, or ""."""
    from cocoon.runtime.sandbox import hostcheck

    if os.geteuid() != 0:
        return "needs root (sandboxes make tap devices, mounts and host cgroups)"
    qemu = cfg.hypervisor.path
    if shutil.which(qemu) is None and not os.access(qemu, os.X_OK):
        return f"no QEMU at {qemu}: install qemu-system-x86 (cocoon's scripts/setup does)"
    ok, detail = hostcheck.default_image_probe(cfg)()
    if not ok:
        return f"no guest image ({detail}): run `cocoon image build`"
    return ""


def _session_config(config: pytest.Config, path: Path) -> Path:
    """The configuration every call gets: the user's (or the host's), the factory options
    applied, written out whole so each call reads the same."""
    import dataclasses

    from cocoon.runtime import config as config_mod
    from cocoon.runtime.errors import CocoonError

    user = config.getoption("cocoon_config")
    try:
        cfg = config_mod.load(Path(user) if user else None).config
    except CocoonError as exc:
        pytest.fail(f"cocoon: --cocoon-config: {exc}", pytrace=False)
    pool, template = config.getoption("cocoon_pool"), config.getoption("cocoon_template")
    factory = dataclasses.replace(
        cfg.factory,
        pool_size=pool or cfg.factory.pool_size,
        template=template or cfg.factory.template,
    )
    cfg = dataclasses.replace(cfg, factory=factory)
    why = _missing(cfg)
    if why:
        pytest.skip(f"cocoon: {why}; {FIX}")
    path.write_text(config_mod.to_toml(cfg))
    return path


@pytest.fixture(scope="session")
def cocoon_runtime(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Runtime]:
    """The session's cocoon: one private state root (per xdist worker), and the pool or
    template when asked for. At the end: the pool drained, the template dropped, and nothing
    of the root's left running."""
    from cocoon.testing import harness, leaks

    base = tmp_path_factory.mktemp("cocoon")
    conf = _session_config(request.config, base / "cocoon.toml")
    # The state root is short (unix socket paths under it must fit 108 bytes; pytest's
    # temporary directories, nested by pytester and xdist, do not), and unique to this
    # process; <basetemp>/cocoon*/root points at it.
    RUN_DIR.mkdir(mode=0o700, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=f"{os.getpid():x}-", dir=RUN_DIR))
    (base / "root").symlink_to(root)
    rt = harness.Runtime(root, base / "work", conf, debug=request.config.getoption("cocoon_debug"))
    filler = None
    if request.config.getoption("cocoon_pool"):
        filler = subprocess.Popen(
            [*rt.argv(), "pool", "fill"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    yield rt
    if filler is not None:
        filler.terminate()
        filler.wait()
    if request.config.getoption("cocoon_pool"):
        rt.call("pool", "drain", timeout=300)
    if request.config.getoption("cocoon_template"):
        rt.call("template", "drop", timeout=300)
    if request.config.stash[KEPT]:
        return  # the kept sandboxes' root stays
    left = leaks.processes_left(str(root))
    mounts = leaks.mounts_under(root)
    if not mounts:
        shutil.rmtree(root, ignore_errors=True)
    if left or mounts:
        pytest.fail(f"cocoon: this session left: {left + mounts}", pytrace=False)


def _cocoon(request: pytest.FixtureRequest, rt: Runtime, label: str) -> Iterator[Cocoon]:
    from cocoon.testing import harness

    c = harness.Cocoon(rt, label)
    yield c
    keep = request.config.getoption("cocoon_keep") and c.failed
    if keep and (hints := c.keep_hints()):
        request.config.stash[KEPT] += hints
        request.config.stash[REMOVE_HINT] = rt.remove_hint()
    problems = c.close(keep=keep)
    if problems:
        pytest.fail("cocoon: left behind: " + "; ".join(problems), pytrace=False)


@pytest.fixture
def cocoon(request: pytest.FixtureRequest, cocoon_runtime: Runtime) -> Iterator[Cocoon]:
    """Containers, pods and networks for one test: ``cocoon.run(...)``, ``cocoon.pod(...)``,
    ``cocoon.network()``. Removed, and checked for leaks, after the test."""
    yield from _cocoon(request, cocoon_runtime, request.node.nodeid)


@pytest.fixture(scope="module")
def cocoon_module(request: pytest.FixtureRequest, cocoon_runtime: Runtime) -> Iterator[Cocoon]:
    """As ``cocoon``, shared by a module's tests and removed after the last of them."""
    yield from _cocoon(request, cocoon_runtime, request.node.nodeid)


@pytest.fixture(scope="session")
def cocoon_session(request: pytest.FixtureRequest, cocoon_runtime: Runtime) -> Iterator[Cocoon]:
    """As ``cocoon``, shared by the whole session (per xdist worker)."""
    yield from _cocoon(request, cocoon_runtime, "session")


def _cocoons(item: pytest.Item) -> list[Cocoon]:
    from cocoon.testing.harness import Cocoon

    args = getattr(item, "funcargs", {})
    return [v for v in args.values() if isinstance(v, Cocoon)]


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    report = yield
    if report.failed and call.when in ("setup", "call"):
        for c in _cocoons(item):
            c.failed = True
            for box in c.containers():
                if box.removed:
                    continue
                for kind, text in box.diagnostics().items():
                    report.sections.append((f"cocoon {box.name} ({box.id}) {kind}", text))
            if item.config.getoption("cocoon_keep"):
                hints = c.keep_hints()
                if hints:
                    text = "\n".join([*hints, c.rt.remove_hint()])
                    report.sections.append(("cocoon --cocoon-keep", text))
    return report


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    kept = config.stash.get(KEPT, [])
    if kept:
        terminalreporter.section("cocoon: sandboxes kept up (--cocoon-keep)")
        for line in [*kept, config.stash[REMOVE_HINT]]:
            terminalreporter.write_line(line)
