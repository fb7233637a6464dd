"""One sandbox's processes, from spawn to teardown: virtiofsd, QEMU, QMP and the agent link.

``Vm.start()`` brings the VM up in order: virtiofsd (if the share is virtio-fs), QEMU, the
QMP connection, the agent channel, an agent health check and an API-hash check, each step
failing at once with QEMU's reason if QEMU exits meanwhile. Once running it watches QEMU and
virtiofsd (an unexpected exit of either is an event and ends the sandbox), fans QMP events
out to the event subscribers and to hot-plug's waiters, and serialises QMP commands.
With a non-root QEMU (``spec.qemu_uids``) it takes a uid for QEMU (monitor.qemuuser),
starts QEMU paused with ``-runas``, checks from /proc that QEMU dropped root, and only then
lets the guest run; the uid is given back once QEMU is gone.
``claim()`` hands a pooled VM to its sandbox (host cgroup, nice level, log, launch file).
``stop()`` shuts down in order (agent DestroySandbox, which answers once the guest has synced,
then QMP quit, then SIGKILL); ``teardown()``
releases everything, and ``remove_state_dir()`` removes the state directory.

May import: the standard library, grpc, qemu.qmp, cocoon.agent (api_hash),
cocoon.runtime.{vm_pb2, errors, logs}, cocoon.runtime.sandbox.hostmount,
cocoon.runtime.network.record (lazily, only when a network was attached),
cocoon.runtime.monitor.{agentcalls, channel, hostcgroup, launch, qemuuser, snapshot, stdio}.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import resource
import signal
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import grpc
import grpc.aio
from qemu.qmp import QMPClient
from qemu.qmp.error import QMPError

from cocoon.agent import api_hash
from cocoon.runtime import logs
from cocoon.runtime import vm_pb2 as vpb
from cocoon.runtime.errors import ChannelError, HostError, StartError
from cocoon.runtime.monitor import hostcgroup, qemuuser, snapshot, stdio
from cocoon.runtime.monitor import launch as L
from cocoon.runtime.monitor.agentcalls import AgentCalls
from cocoon.runtime.monitor.channel import SerialMuxHost, VsockRelay
from cocoon.runtime.sandbox import hostmount

log = logging.getLogger("cocoon.monitor")

VFIO_DEV = Path("/dev/vfio")  # a group's node, lent to a non-root QEMU while plugged
EventMatch = Callable[[dict[str, Any]], bool]
RESTORE_TIMEOUT_S = 20.0  # a restore takes well under a second: past this, boot cold


def tail(path: Path, lines: int) -> str:
    try:
        data = path.read_bytes()[-64 * 1024 :]
    except OSError:
        return ""
    text = data.decode("utf-8", "replace").replace("\r", "")
    return "\n".join(text.strip().splitlines()[-lines:])


def describe_exit(rc: int) -> str:
    if rc < 0:
        return f"killed by {signal.Signals(-rc).name}"
    return f"exited with status {rc}"


def remove_state_dir(d: Path) -> None:
    try:
        hostmount.safe_rmtree(d)
    except (OSError, HostError) as exc:
        log.error("cannot remove %s: %s", d, exc)


class Vm:
    def __init__(self, spec: L.LaunchSpec, umask: int = 0o022) -> None:
        self.spec = spec
        self.umask = umask  # the caller's, for virtiofsd (the guest's files); ours is 077
        self.dir = spec.dir
        self.state = "booting"  # "running", "stopping", "stopped"
        self.qemu: asyncio.subprocess.Process | None = None
        self.virtiofsd: asyncio.subprocess.Process | None = None
        self.qmp = QMPClient(f"sandbox-{spec.sandbox_id}")
        self.qmp_lock = asyncio.Lock()
        self.link: SerialMuxHost | VsockRelay | None = None
        self.agent: grpc.aio.Channel | None = None
        self.calls: AgentCalls | None = None  # the monitor's own agent RPCs
        self.server: grpc.aio.Server | None = None
        self.stdio = stdio.Endpoint(
            lambda: self.agent,
            spec.request_timeout_s,
            lambda: self.link,
        )
        self.subscribers: list[asyncio.Queue[vpb.Event | None]] = []
        self.done = asyncio.Event()
        self.stop_task: asyncio.Task[str] | None = None
        self.moving: asyncio.Future[None] | None = None  # a claim's cgroup move (claim)
        self.qemu_exit: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self.t_spawn = 0.0
        self.boot_seconds = 0.0
        self.tasks: list[asyncio.Task[None]] = []
        self.event_waiters: list[tuple[str, EventMatch, asyncio.Future[dict[str, Any]]]] = []
        self.uid = 0  # a non-root QEMU's uid (0: QEMU runs as root)
        self.restored = False  # restored from a template (spec.template == "restore")
        self.restore_failure = ""  # why a restore fell back to a cold boot

    @property
    def qemu_pid(self) -> int:
        return self.qemu.pid if self.qemu else 0

    # ------------------------------------------------------------------ events
    def publish(self, kind: str, detail: str, data: object = None) -> None:
        ev = vpb.Event(
            time=time.time(),
            kind=kind,
            detail=detail,
            data_json=json.dumps(data) if data is not None else "",
        )
        log.info("event %s: %s", kind, detail)
        for q in self.subscribers:
            q.put_nowait(ev)

    # ------------------------------------------------------------------ start-up
    async def start(self) -> None:
        spec = self.spec
        deadline = time.monotonic() + spec.ready_timeout_s
        if spec.shared_fs == "virtio-fs" and spec.template != "save":
            await self._start_virtiofsd()
        if spec.qemu_uids:
            first, count = spec.qemu_uids
            try:
                self.uid = await asyncio.to_thread(qemuuser.allocate, first, count, spec.sandbox_id)
            except (qemuuser.UidError, OSError) as exc:
                raise StartError(f"no uid for a non-root QEMU: {exc}") from exc
            (self.dir / L.QEMU_UID).write_text(f"{self.uid}\n")
        argv = list(spec.argv)
        if spec.template == "restore":
            try:
                await self._restore(min(deadline, time.monotonic() + RESTORE_TIMEOUT_S))
            except (StartError, OSError, QMPError, grpc.aio.AioRpcError) as exc:
                why = exc.details() if isinstance(exc, grpc.aio.AioRpcError) else str(exc)
                log.warning(
                    "sandbox %s: restoring template %s failed (%s); booting cold instead",
                    spec.sandbox_id,
                    spec.template_dir,
                    why,
                )
                self.restore_failure = why or type(exc).__name__
                await self._abandon_attempt()
                argv = list(spec.cold_argv)
            else:
                self._running()
                return
        self.t_spawn = time.monotonic()
        await self._spawn_qemu(argv)
        await self._race(self._connect_qmp(deadline), "QMP")
        if self.uid:
            await self._race(self._resume_unprivileged(), "guest")
        await self._race(self._connect_agent(deadline), "agent")
        self._running()

    def _running(self) -> None:
        self.boot_seconds = time.monotonic() - self.t_spawn
        self.state = "running"
        self.tasks.append(asyncio.create_task(self._qmp_events()))
        if self.virtiofsd is not None:
            self.tasks.append(asyncio.create_task(self._watch_virtiofsd()))
        self.tasks.append(asyncio.create_task(self._watch_link()))
        for sock in self.dir.glob("*.sock"):  # made 0700 under umask 077: no use for x
            with contextlib.suppress(OSError):
                sock.chmod(0o600)

    async def _spawn_qemu(self, argv: list[str]) -> None:
        if self.uid:
            argv = [*argv, "-runas", f"{self.uid}:{self.uid}"]
        self.qemu = await self._spawn(argv, L.QEMU_LOG, "QEMU")
        (self.dir / L.QEMU_PID).write_text(f"{self.qemu.pid}\n")
        self.tasks.append(asyncio.create_task(self._watch_qemu()))

    # ------------------------------------------------------------------ templates
    async def _restore(self, deadline: float) -> None:
        """The VM restored from the template (monitor.snapshot): its RAM copied, its device
        state loaded into a paused QEMU, the share plugged, the guest resumed (once a non-root
        QEMU dropped root), the agent reached, and the clone set apart from its template (RNG
        reseeded, clock set) before anything else runs in it."""
        spec = self.spec
        tdir = Path(spec.template_dir)
        memory = Path(spec.memory_file)
        self.t_spawn = time.monotonic()
        await asyncio.to_thread(snapshot.copy_memory, tdir / L.TEMPLATE_MEMORY, memory)
        try:
            await self._spawn_qemu(list(spec.argv))
            await self._race(self._connect_qmp(deadline), "QMP")
        finally:  # QEMU maps it before it answers QMP; gone with QEMU from then on
            with contextlib.suppress(FileNotFoundError):
                memory.unlink()
        left = max(deadline - time.monotonic(), 1.0)
        await self._race(
            snapshot.load(self.qmp_command, self.pass_fd, tdir / L.TEMPLATE_STATE, left), "restore"
        )
        if self.virtiofsd is not None:
            await self._race(
                snapshot.plug_share(self.qmp_command, self.pass_fd, self.dir / "virtiofsd.sock"),
                "share",
            )
        if self.uid:
            await self._race(self._resume_unprivileged(), "guest")
        else:
            await self.qmp_command("cont", None)
        await self._race(self._connect_agent(deadline), "agent")
        assert self.calls is not None
        await self._race(self.calls.set_clone_apart(os.urandom(64), time.time()), "reseed")
        if self.virtiofsd is not None:
            left_ms = int(max(deadline - time.monotonic(), 1.0) * 1000)
            await self._race(
                self.calls.wait_device("virtiofs", L.FS_PORT_ADDRESS, left_ms), "share"
            )
        self.restored = True
        log.info(
            "sandbox %s restored from template %s in %.2fs",
            spec.sandbox_id,
            tdir.name,
            time.monotonic() - self.t_spawn,
        )

    async def _abandon_attempt(self) -> None:
        """What a failed restore started is gone (QEMU, QMP, the agent link), ready for a cold
        boot in the same state directory with the same uid."""
        for task in self.tasks:
            task.cancel()
        if self.qemu is not None and not self.qemu_exit.done():
            with contextlib.suppress(ProcessLookupError):
                self.qemu.kill()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.qemu.wait(), 30)
        for task in self.tasks:
            with contextlib.suppress(BaseException):
                await task
        self.tasks = []
        await self._close_links()
        self.qmp = QMPClient(f"sandbox-{self.spec.sandbox_id}")
        self.qemu, self.link, self.agent, self.calls = None, None, None, None
        self.qemu_exit = asyncio.get_running_loop().create_future()

    async def _close_links(self) -> None:
        """The agent's channel, its link and QMP closed; a restore's RAM copy that QEMU never
        mapped removed."""
        if self.agent is not None:
            await self.agent.close()
        if self.link is not None:
            await self.link.close()
        with contextlib.suppress(Exception):
            await self.qmp.disconnect()
        if self.spec.memory_file:
            with contextlib.suppress(FileNotFoundError):
                Path(self.spec.memory_file).unlink()

    async def save_template(self, timeout: float) -> None:
        """A VM booted with ``template = "save"`` paused and saved into its template
        directory (its RAM is already in the template's memory file); QEMU is left paused
        for teardown."""
        state = Path(self.spec.template_dir) / L.TEMPLATE_STATE
        assert self.calls is not None
        # Once the guest loaded its late kernel modules (the call waits for them): every clone
        # then starts with them in, instead of loading them again after its restore.
        await self.calls.memory_total()
        await snapshot.save(self.qmp_command, self.pass_fd, state, timeout)

    async def serve(self, handlers: Sequence[grpc.GenericRpcHandler]) -> None:
        """Serves ``handlers`` on the monitor's socket (stopped by ``teardown``)."""
        self.server = grpc.aio.server()
        self.server.add_generic_rpc_handlers(handlers)
        sock = self.dir / L.MONITOR_SOCK
        self.server.add_insecure_port(f"unix:{sock}")
        await self.server.start()
        sock.chmod(0o600)

    async def _race(self, coro: Any, what: str) -> None:
        """Runs ``coro`` but fails at once, with QEMU's reason, if QEMU exits meanwhile."""
        task = asyncio.ensure_future(coro)
        await asyncio.wait({task, self.qemu_exit}, return_when=asyncio.FIRST_COMPLETED)
        if task.done() and task.exception() is None:
            return
        if task.done():
            # A broken socket is usually QEMU going away: give its exit a moment to land
            # so the error names the real cause.
            await asyncio.wait({self.qemu_exit}, timeout=1.0)
            if not self.qemu_exit.done():
                task.result()
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        raise StartError(
            f"QEMU {describe_exit(self.qemu_exit.result())} before the {what} was ready"
        )

    async def _spawn(
        self, argv: list[str], log_name: str, what: str, umask: int = -1
    ) -> asyncio.subprocess.Process:
        """Starts a helper in its own session with stdout/stderr in a state-dir log file."""
        out = open(self.dir / log_name, "wb")  # noqa: SIM115 - handed to the child
        try:
            return await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=out,
                stderr=out,
                start_new_session=True,
                umask=umask,
            )
        except OSError as exc:
            raise StartError(f"cannot run {what} {argv[0]}: {exc.strerror}") from exc
        finally:
            out.close()

    async def _start_virtiofsd(self) -> None:
        share = self.dir / "shared"
        share.mkdir(exist_ok=True)
        sock = self.dir / "virtiofsd.sock"
        self.virtiofsd = await self._spawn(
            [
                self.spec.virtiofsd,
                f"--socket-path={sock}",
                "-o",
                f"source={share}",
                "-o",
                "cache=auto",
                # no device nodes made in host directories for the guest (FIFOs and sockets
                # need no capability): root in the guest is less than root on the share
                "-o",
                "modcaps=-mknod",
            ],
            L.VIRTIOFSD_LOG,
            "virtiofsd",
            umask=self.umask,  # it makes the guest's files: the guest's modes, not our 077
        )
        for _ in range(500):
            if sock.exists():
                return
            if self.virtiofsd.returncode is not None:
                break
            await asyncio.sleep(0.01)
        raise StartError(
            f"virtiofsd did not come up: {tail(self.dir / L.VIRTIOFSD_LOG, 5) or 'no output'}"
        )

    async def _connect_qmp(self, deadline: float) -> None:
        path = str(self.dir / "qmp.sock")
        while True:
            if not os.path.exists(path) and time.monotonic() <= deadline:
                # Not yet bound: no connect attempt, which qemu.qmp would log as an ERROR.
                await asyncio.sleep(0.02)
                continue
            try:
                await self.qmp.connect(path)
                return
            except (QMPError, OSError) as exc:
                if time.monotonic() > deadline:
                    raise StartError(f"QMP socket {path}: {exc}") from exc
                await asyncio.sleep(0.02)

    async def _resume_unprivileged(self) -> None:
        """QEMU answers QMP once it ran -runas: the guest, paused so far, runs only once
        /proc shows that every uid of QEMU is the sandbox's and QEMU holds no capability."""
        assert self.qemu is not None
        uids = qemuuser.uids_of(self.qemu.pid)
        caps = qemuuser.capabilities_of(self.qemu.pid)
        if uids != (self.uid,) * 4 or caps:
            raise StartError(
                f"QEMU did not drop root (uids {uids}, capabilities {caps:#x}); the guest was "
                "never started"
            )
        await self.qmp_command("cont", None)

    async def _connect_agent(self, deadline: float) -> None:
        spec = self.spec
        listen = self.dir / L.AGENT_SOCK
        if spec.channel == "vsock":
            self.link = VsockRelay(spec.vsock_cid, 1024, listen)
        else:
            self.link = SerialMuxHost(self.dir / "agent-port.sock", listen)
        try:
            await self.link.connect(deadline)
        except ChannelError as exc:
            raise StartError(
                f"the guest agent did not answer within {spec.ready_timeout_s:g}s ({exc})"
            ) from exc
        await self.link.serve()
        self.agent = grpc.aio.insecure_channel(f"unix:{listen}")
        self.calls = AgentCalls(self.agent, spec.request_timeout_s)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise StartError(f"the guest agent did not answer within {spec.ready_timeout_s:g}s")
            try:
                ver = await self.calls.version(timeout=min(left, 5.0))
                break
            except grpc.aio.AioRpcError as exc:
                log.debug("agent not ready yet: %s", exc.code())
                await asyncio.sleep(0.05)
        want = api_hash()
        if ver.api_hash != want:
            raise StartError(
                f"guest agent {ver.agent_version} speaks another API (hash {ver.api_hash[:12]}, "
                f"host {want[:12]}): rebuild the guest image (`cocoon image build`)"
            )
        log.info("agent %s ready after %.2fs", ver.agent_version, time.monotonic() - self.t_spawn)

    # ------------------------------------------------------------------ running
    async def _watch_qemu(self) -> None:
        assert self.qemu is not None
        rc = await self.qemu.wait()
        self.qemu_exit.set_result(rc)
        await self._ended_unexpectedly("qemu-exited", f"QEMU {describe_exit(rc)} unexpectedly", rc)

    async def _watch_virtiofsd(self) -> None:
        """virtiofsd serves the containers' root filesystems: a VM without it is of no use
        (every exec and file access would hang), so its death stops the sandbox, as Kata does."""
        assert self.virtiofsd is not None
        rc = await self.virtiofsd.wait()
        detail = f"virtiofsd {describe_exit(rc)} unexpectedly: the shared filesystem is gone"
        await self._ended_unexpectedly("virtiofsd-exited", detail, rc)

    async def _watch_link(self) -> None:
        """The agent's channel is gone for good (the port closed, or the guest sent what the
        mux cannot parse): nothing can reach the containers, so the sandbox ends. QEMU's own
        exit closes the port too: then its watcher tells that story."""
        assert self.link is not None
        await self.link.lost.wait()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.qemu_exit), 1.0)
            return
        detail = "the agent's channel was lost (the port closed or the guest broke the protocol)"
        await self._ended_unexpectedly("agent-lost", detail, 0)

    async def _ended_unexpectedly(self, kind: str, detail: str, rc: int) -> None:
        """A process the sandbox needs exited outside an orderly stop: an event, QEMU killed
        (if it is not the one that exited), and the sandbox done."""
        if self.state != "running" or self.stop_task is not None:
            return
        log.error("sandbox %s: %s", self.spec.sandbox_id, detail)
        self.state = "stopped"
        self.publish(kind, detail, {"status": rc})
        if self.qemu is not None and not self.qemu_exit.done():
            with contextlib.suppress(ProcessLookupError):
                self.qemu.kill()
        await asyncio.sleep(0.3)  # let event subscribers read it
        self.done.set()

    async def _qmp_events(self) -> None:
        with contextlib.suppress(QMPError, asyncio.CancelledError):
            async for ev in self.qmp.events:
                name = str(ev.get("event", ""))
                raw = ev.get("data")
                data: dict[str, Any] = raw if isinstance(raw, dict) else {}
                for waiter in list(self.event_waiters):
                    if waiter[0] == name and not waiter[2].done() and waiter[1](data):
                        waiter[2].set_result(data)
                self.publish("qmp", name, data)

    async def wait_event(
        self, name: str, match: EventMatch, timeout: float
    ) -> dict[str, Any] | None:
        """The next QMP event ``name`` whose data matches, or None after ``timeout``."""
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        entry = (name, match, fut)
        self.event_waiters.append(entry)
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            return None
        finally:
            self.event_waiters.remove(entry)

    async def qmp_command(self, command: str, args: dict[str, Any] | None) -> Any:
        async with self.qmp_lock:
            return await self.qmp.execute(command, args)

    async def pass_fd(self, fd: int, name: str) -> None:
        async with self.qmp_lock:
            self.qmp.send_fd_scm(fd)
            await self.qmp.execute("getfd", {"fdname": name})

    async def add_fd(self, fd: int, opaque: str) -> int:
        """Hands QEMU ``fd`` in a new fd set (``/dev/fdset/N`` to QEMU); returns N."""
        async with self.qmp_lock:
            self.qmp.send_fd_scm(fd)
            reply = await self.qmp.execute("add-fd", {"opaque": opaque})
        assert isinstance(reply, dict)
        return int(reply["fdset-id"])

    def grant_vfio(self, group: str) -> Callable[[], None]:
        """Before a VFIO group's devices are plugged: a non-root QEMU gets the group's node
        (and the memlock limit to pin guest RAM for DMA); returns what gives them back."""
        if not self.uid:
            return lambda: None
        if not group.isdigit():
            raise qemuuser.UidError(f"{group!r} is not a group number (/dev/vfio/N)")
        node = VFIO_DEV / group
        owner = qemuuser.grant(node, self.uid)
        try:
            inf = resource.RLIM_INFINITY
            resource.prlimit(self.qemu_pid, resource.RLIMIT_MEMLOCK, (inf, inf))
        except OSError as exc:
            qemuuser.revoke(node, owner)
            raise qemuuser.UidError(f"QEMU's memlock limit: {exc.strerror}") from exc
        return lambda: qemuuser.revoke(node, owner)

    # ------------------------------------------------------------------ pool
    def host_pids(self) -> list[int]:
        """The sandbox's host processes: the monitor, QEMU, virtiofsd (whose sandbox is a
        child of its own), and whatever else is in its host cgroup."""
        procs = (self.qemu, self.virtiofsd)
        pids = {os.getpid(), *(p.pid for p in procs if p is not None and p.returncode is None)}
        pids.update(hostcgroup.members(self.spec.cgroup))
        return sorted(pids)

    async def claim(self, spec: L.LaunchSpec, nice: int) -> None:
        """A pooled VM becomes ``spec``'s sandbox: its processes take the claimer's nice level,
        the monitor logs where the claimer logs, and the launch file says whose it is. Their
        move to the sandbox's host cgroup (the pool's is then removed) goes on in a thread
        after the answer (``claim_settled``): a cgroup migration waits for an RCU grace
        period (~10 ms of the first write here), which the container's create, the claimer's
        next call, need not wait for. A cgroup that cannot be joined is refused here."""
        old = self.spec
        for d in spec.cgroup.join:
            procs = Path(d, "cgroup.procs")
            if not os.access(procs, os.W_OK):
                raise hostcgroup.CgroupError(
                    f"joining host cgroup {d}: "
                    + ("Permission denied" if procs.exists() else "No such cgroup")
                )
        pids = self.host_pids()
        for pid in pids:
            with contextlib.suppress(OSError):  # a process that just ended
                for task in Path(f"/proc/{pid}/task").iterdir():
                    with contextlib.suppress(OSError):
                        os.setpriority(os.PRIO_PROCESS, int(task.name), nice)
        self.moving = asyncio.ensure_future(asyncio.to_thread(_move, pids, old.cgroup, spec.cgroup))
        self.spec = spec
        spec.write(self.dir / L.LAUNCH_FILE)
        log_file = Path(spec.log_file) if spec.log_file else None
        logs.setup_monitor(log_file, spec.log_format, spec.debug)
        log.info("pooled VM %s claimed by sandbox %s", old.sandbox_id, spec.sandbox_id)
        self.publish("claimed", spec.sandbox_id)

    async def claim_settled(self) -> None:
        """Waits for a claim's cgroup move; its failure is raised once (CgroupError)."""
        moving, self.moving = self.moving, None
        if moving is not None:
            await moving

    # ------------------------------------------------------------------ stop
    async def stop(self, timeout: float) -> str:
        if self.stop_task is None:
            self.stop_task = asyncio.create_task(self._do_stop(timeout))
        return await asyncio.shield(self.stop_task)

    async def _wait_qemu(self, timeout: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(self.qemu_exit), timeout)
            return True
        return False

    async def _do_stop(self, timeout: float) -> str:
        if self.qemu is None or self.qemu_exit.done():
            return "already-dead"
        self.state = "stopping"
        self.publish("stopping", "orderly shutdown")
        how = "sigkill"
        synced = False
        if self.calls is not None:  # the agent answers once the guest has synced: the whole
            with contextlib.suppress(grpc.aio.AioRpcError):  # stop's time is the sync's
                await self.calls.destroy_sandbox(timeout=timeout)
                synced = True
        if self.qmp.runstate.name == "RUNNING":  # nothing left to wait for in the guest
            with contextlib.suppress(QMPError, OSError):
                async with self.qmp_lock:
                    await asyncio.wait_for(self.qmp.execute("quit"), timeout)
        if await self._wait_qemu(timeout):
            how = "agent" if synced else "qmp-quit"
        if how == "sigkill":
            with contextlib.suppress(ProcessLookupError):
                self.qemu.kill()
            await self._wait_qemu(30)
        self.state = "stopped"
        log.info("sandbox %s stopped (%s)", self.spec.sandbox_id, how)
        return how

    async def teardown(self) -> None:
        """Releases everything. Safe to call in any state, more than once."""
        with contextlib.suppress(OSError):  # a claim's move, before what removes the
            await self.claim_settled()  # cgroups it moves to (a failure was reported)
        if self.qemu is not None and not self.qemu_exit.done():
            with contextlib.suppress(ProcessLookupError):
                self.qemu.kill()
            await self._wait_qemu(30)
        if self.uid and (self.qemu is None or self.qemu_exit.done()):
            qemuuser.release(self.uid)  # a QEMU that would not die keeps it (never reused)
            self.uid = 0
        if (self.dir / L.NETWORK_RECORD).exists():  # QEMU is gone: so are its tap fds
            from cocoon.runtime.network import record

            await asyncio.to_thread(record.unplumb_recorded, self.dir / L.NETWORK_RECORD)
        for q in self.subscribers:
            q.put_nowait(None)
        await self.stdio.close()
        if self.server is not None:
            await self.server.stop(grace=1.0)
        await self._close_links()
        if self.virtiofsd is not None and self.virtiofsd.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.virtiofsd.terminate()
            try:
                await asyncio.wait_for(self.virtiofsd.wait(), 3)
            except TimeoutError:
                self.virtiofsd.kill()
                await self.virtiofsd.wait()

    def diagnostics(self) -> str:
        parts = []
        q = tail(self.dir / L.QEMU_LOG, 15)
        if q:
            parts.append("QEMU stderr (last lines):\n" + q)
        c = tail(self.dir / "console.log", 25)
        if c:
            parts.append("guest console (last lines):\n" + c)
        v = tail(self.dir / L.VIRTIOFSD_LOG, 5)
        vfs = self.virtiofsd
        if v and vfs is not None and vfs.returncode not in (None, 0):
            parts.append("virtiofsd (last lines):\n" + v)
        return "\n".join(parts)


def _move(pids: list[int], old: L.HostCgroup, new: L.HostCgroup) -> None:
    """A claimed VM's processes into its sandbox's host cgroup, then the pool's removed."""
    for pid in pids:
        try:
            hostcgroup.join(new, pid)
        except hostcgroup.CgroupError:
            if Path(f"/proc/{pid}").exists():
                raise
    hostcgroup.remove(old)
