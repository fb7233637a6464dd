"""A real guest under a real monitor: boot, ask the agent, stop; QEMU or virtiofsd killed
under it."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest

from cocoon.agent import agent_pb2 as apb
from cocoon.agent import api_hash
from cocoon.runtime import vm_pb2 as vpb
from cocoon.runtime.config import Config
from cocoon.runtime.container import busybox
from cocoon.runtime.sandbox import client, paths, qemu_argv
from cocoon.runtime.sandbox import launcher as sandbox
from cocoon.testing.leaks import live_processes
from tests.integration.cli import Cli
from tests.integration.conftest import grpc_stubs
from tests.integration.procs import parent_of

pytestmark = [pytest.mark.qemu, pytest.mark.root]
MIB = 1024 * 1024


def test_boot_guest_details_and_orderly_stop(
    cfg: Config, state_root: Path, image: sandbox.GuestFiles
) -> None:
    sb = sandbox.start(cfg, state_root, "boot1")
    try:
        assert (state_root / "sandboxes" / "boot1" / "monitor.sock").exists()
        with sb.client() as c:  # as the CLI calls: JSON on stdio.sock
            ver = c.agent.Version(timeout=10)
            details = c.agent.GetGuestDetails(timeout=10)
            status = c.vm.Status(timeout=10)
        assert ver["api_hash"] == api_hash()
        assert details["kernel_release"].endswith("-cloud-amd64")
        assert details["kernel_release"] != os.uname().release
        assert details["machine"] == "x86_64"
        assert details["cpus_online"] == cfg.hypervisor.default_vcpus
        assert details["cpus_possible"] == (cfg.hypervisor.default_maxvcpus or os.cpu_count())
        want = cfg.hypervisor.default_memory_mib * MIB
        # The kernel keeps some RAM for itself; MemTotal is a little under the boot size.
        mem_total, mem_available = (
            int(details[k]) for k in ("mem_total_bytes", "mem_available_bytes")
        )
        assert want - 64 * MIB < mem_total <= want
        assert 0 < mem_available <= mem_total
        assert details["channel"] == "virtio-serial"
        assert details["agent_ready_uptime_seconds"] > 0
        assert status["state"] == "running"
        assert status["qemu_pid"] > 0 and status["monitor_pid"] == sb.monitor_pid
        assert status["accel"] in ("kvm", "tcg")
        # A bad request comes back through the monitor as a clear status.
        with sb.client() as c, pytest.raises(client.CallError) as err:
            c.agent.CreateContainer({"container_id": "x"}, timeout=10)
        assert err.value.code == "INVALID_ARGUMENT"
        assert "spec is not JSON" in err.value.details
        # ... and so do the calls the agent does not implement yet, over gRPC too.
        with grpc_stubs(sb.dir) as (agent, _), pytest.raises(grpc.RpcError) as grpc_err:
            agent.GetOOMEvent(apb.GetOOMEventRequest(), timeout=10)
        assert grpc_err.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        how = sandbox.stop(state_root, "boot1", cfg.runtime.shutdown_timeout_s)
    assert how == "agent"  # the guest powered itself off on DestroySandbox
    assert sb.process is not None and sb.process.wait(10) == 0
    assert not (state_root / "sandboxes" / "boot1").exists()


def test_qemu_killed_is_reported_and_cleaned_up(
    cfg: Config, state_root: Path, image: sandbox.GuestFiles
) -> None:
    sb = sandbox.start(cfg, state_root, "kill1")
    events: list[vpb.Event] = []
    subscribed = threading.Event()

    def watch() -> None:
        with grpc_stubs(sb.dir) as (_, vm):
            stream = vm.Events(vpb.EventsRequest(), timeout=60)
            subscribed.set()
            try:
                for ev in stream:
                    events.append(ev)
            except grpc.RpcError:
                pass  # the monitor goes away after reporting

    t = threading.Thread(target=watch, daemon=True)
    t.start()
    assert subscribed.wait(10)
    time.sleep(0.3)  # the Events call is registered on the monitor side
    with sb.client() as c:
        qemu_pid = c.vm.Status(timeout=10)["qemu_pid"]
    os.kill(qemu_pid, signal.SIGKILL)
    assert sb.process is not None
    assert sb.process.wait(30) == 0, "the monitor should exit by itself"
    t.join(10)
    kinds = [(e.kind, e.detail) for e in events]
    assert ("qemu-exited", "QEMU killed by SIGKILL unexpectedly") in kinds, kinds
    assert not (state_root / "sandboxes" / "kill1").exists()
    # A stop afterwards is a clear error, not a hang.
    with pytest.raises(Exception, match="does not exist"):
        sandbox.stop(state_root, "kill1")


def test_virtiofsd_killed_stops_the_sandbox_and_its_container(cli: Cli, tmp_path: Path) -> None:
    """virtiofsd SIGKILLed under a running container: the monitor ends the sandbox, `state`
    says stopped, exec fails at once (no hang), delete cleans everything."""
    b = busybox.make_bundle(tmp_path / "b", ["sleep", "1000"])
    assert cli.create("c1", b).returncode == 0, cli.last_error()
    cli.ok("start", "c1")
    d = paths.sandbox_dir(cli.root, "c1")
    monitor = int((d / "monitor.pid").read_text())
    vfs = [
        pid
        for pid, cmd in live_processes()
        if "virtiofsd" in cmd.split(" ", 1)[0] and str(d) in cmd and parent_of(pid) == monitor
    ]
    assert len(vfs) == 1, vfs
    os.kill(vfs[0], signal.SIGKILL)
    end = time.monotonic() + 60
    while json.loads(cli.ok("state", "c1"))["status"] != "stopped":
        assert time.monotonic() < end, "still not stopped"
        time.sleep(0.5)
    t = time.monotonic()
    r = cli("exec", "c1", "true", timeout=60)
    assert r.returncode == 1 and time.monotonic() - t < 30, r
    cli.ok("delete", "c1")
    assert not d.exists()


def test_the_guest_reports_free_memory_in_the_order_the_host_asked(
    cli: Cli, tmp_path: Path
) -> None:
    """The kernel command line asks for free page reporting in 128 KiB blocks; Linux 6.1's
    balloon driver resets that when it registers, and the agent sets it again once the late
    modules (the balloon among them) are in, before any container is created."""
    b = busybox.make_bundle(tmp_path / "b", ["sleep", "1000"])
    assert cli.create("fpr", b).returncode == 0, cli.last_error()
    cli.ok("start", "fpr")
    order = cli.ok(
        "exec", "fpr", "cat", "/sys/module/page_reporting/parameters/page_reporting_order"
    )
    cmdline = cli.ok("exec", "fpr", "cat", "/proc/cmdline").split()
    assert f"page_reporting.page_reporting_order={qemu_argv.REPORTING_ORDER}" in cmdline
    assert order.strip() == str(qemu_argv.REPORTING_ORDER)
    cli.ok("delete", "--force", "fpr")
