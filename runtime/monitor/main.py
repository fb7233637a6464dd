"""The sandbox monitor process: ``python -m cocoon.runtime.monitor.main --launch FILE``.

Reads the launch file, sets up logging, brings the VM up (monitor.vm), then serves the VM service
(monitor.service) and the forwarded agent service (monitor.forward) on the monitor's socket, and
both as framed JSON calls on the shims' socket (monitor.calls); a template's monitor (``template =
"save"``) instead saves the booted VM and ends. Whatever the outcome, one JSON line goes to
``--ready-fd``: ``{"ok": true, ...}`` or ``{"ok": false, "error": ..., "details": ...}`` (QEMU's
stderr and console tails). A failed start tears everything down and removes the state directory
before reporting; so does the end of a sandbox (SIGTERM, a Shutdown call, or QEMU's death), orderly
or not.

May import: the standard library, qemu.qmp (QMPError), cocoon.runtime.{fds, logs, errors},
cocoon.runtime.monitor.{calls, forward, hostcgroup, ksm, launch, service, vm}.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from pathlib import Path

from qemu.qmp.error import QMPError

from cocoon.runtime import fds, logs
from cocoon.runtime.errors import StartError
from cocoon.runtime.monitor import calls, forward, hostcgroup, ksm, service
from cocoon.runtime.monitor import launch as L
from cocoon.runtime.monitor.vm import Vm, remove_state_dir

log = logging.getLogger("cocoon.monitor")


async def start(vm: Vm) -> None:
    """Boots the VM, then serves the VM service and the forwarded agent service."""
    await vm.start()
    assert vm.calls is not None  # connected by start()
    svc = service.Service(
        vm.spec,
        vm,
        vm.qmp_command,
        vm.wait_event,
        vm.calls,
        pass_fd=vm.pass_fd,
        add_fd=vm.add_fd,
        grant_vfio=vm.grant_vfio,
    )
    await vm.serve([service.handler(svc), forward.handlers(lambda: vm.agent)])
    vm.stdio.calls = calls.Calls(svc, lambda: vm.agent)
    await vm.stdio.serve(vm.dir / L.STDIO_SOCK)


async def amain(spec: L.LaunchSpec, ready_fd: int, umask: int = 0o022) -> int:
    loop = asyncio.get_running_loop()
    vm = Vm(spec, umask)
    stop_signal = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop_signal.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)
    if spec.template == "save":
        return await save_template(vm, ready_fd)
    try:
        await start(vm)
    except (StartError, OSError, QMPError) as exc:
        return await failed(vm, ready_fd, exc, f"sandbox {spec.sandbox_id} failed to start")
    fds.report(
        ready_fd,
        {
            "ok": True,
            "boot_seconds": vm.boot_seconds,
            "pid": os.getpid(),
            "restored": vm.restored,
            "restore_failure": vm.restore_failure,
        },
    )

    sig_wait = asyncio.create_task(stop_signal.wait())
    done_wait = asyncio.create_task(vm.done.wait())
    await asyncio.wait({sig_wait, done_wait}, return_when=asyncio.FIRST_COMPLETED)
    if stop_signal.is_set():
        await vm.stop(spec.shutdown_timeout_s)
    await vm.teardown()
    end(vm.spec)  # a claimed pooled VM's spec is its sandbox's now
    return 0


async def failed(vm: Vm, ready_fd: int, exc: BaseException, what: str) -> int:
    """A start that failed: logged, everything torn down, the failure reported (with QEMU's
    and the console's tails, read before teardown removes them)."""
    details = vm.diagnostics()
    log.error("%s: %s", what, exc)
    await vm.teardown()
    end(vm.spec)
    fds.report(ready_fd, {"ok": False, "error": str(exc), "details": details})
    return 1


async def save_template(vm: Vm, ready_fd: int) -> int:
    """``template = "save"``: the VM booted to agent-ready, saved into its template directory
    (monitor.snapshot), and gone again; the report says whether the save worked."""
    try:
        await vm.start()
        await vm.save_template(max(vm.spec.ready_timeout_s, 30.0))
    except (StartError, OSError, QMPError) as exc:
        return await failed(vm, ready_fd, exc, f"template {vm.spec.template_dir} not saved")
    boot = vm.boot_seconds
    await vm.teardown()
    end(vm.spec)
    fds.report(ready_fd, {"ok": True, "boot_seconds": boot, "pid": os.getpid()})
    return 0


def end(spec: L.LaunchSpec) -> None:
    """The state directory removed, with the link that named it (a claimed pooled VM), and the
    monitor out of the sandbox's host cgroup."""
    remove_state_dir(spec.dir)
    if spec.alias:
        L.drop_dangling(Path(spec.alias))
    hostcgroup.leave(spec.cgroup, os.getpid())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cocoon-monitor")
    ap.add_argument("--launch", required=True, type=Path)
    ap.add_argument("--ready-fd", type=int, default=-1)
    args = ap.parse_args(argv)
    fds.close_inherited({args.ready_fd})
    umask = os.umask(0o077)  # sockets, logs and files of the state dir are the owner's only
    try:
        return _main(args, umask)
    except OSError as exc:  # before the VM is up (a full state filesystem, EMFILE...)
        fds.report(args.ready_fd, {"ok": False, "error": f"monitor: {exc}", "details": ""})
        return 1


def _main(args: argparse.Namespace, umask: int) -> int:
    spec = L.LaunchSpec.read(args.launch)
    logs.setup_monitor(Path(spec.log_file) if spec.log_file else None, spec.log_format, spec.debug)
    (spec.dir / L.MONITOR_PID).write_text(f"{os.getpid()}\n")
    if spec.mergeable:
        log.debug("memory offered to KSM: %d mappings", ksm.mergeable())
    try:  # first, so that QEMU and virtiofsd are born in the sandbox's host cgroup
        hostcgroup.join(spec.cgroup, os.getpid())
    except hostcgroup.CgroupError as exc:
        fds.report(args.ready_fd, {"ok": False, "error": str(exc), "details": ""})
        return 1
    return asyncio.run(amain(spec, args.ready_fd, umask))


def run() -> None:
    """main(), then out without the interpreter's teardown of asyncio, gRPC and the rest
    (~25 ms that a `delete` waits for: it waits for this process to be gone). Everything the
    sandbox held was released before main() returned; the logs are flushed here."""
    status = main()
    logging.shutdown()
    for f in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            f.flush()
    os._exit(status)


if __name__ == "__main__":
    run()
