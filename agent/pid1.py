"""The agent's main: PID 1 duties (signals, reaping, power-off) and wiring the channel to gRPC.

In the guest the first-stage init switch_root's straight into ``python3 -m cocoon.agent``, so
this process is PID 1: it blocks the signals it handles before any thread starts and takes
them with sigwait in the main thread, reaps every child on SIGCHLD (orphans are re-parented to
it), and powers the VM off on DestroySandbox or when the channel cannot be served.

May import: the standard library, grpc, cocoon.agent.{agent_pb2_grpc, channel, containers,
deferred, kmod, libc, logbuf, network, proc, server}.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc

from cocoon.agent import agent_pb2_grpc as pbg
from cocoon.agent import channel, deferred, libc, network
from cocoon.agent.containers import Manager
from cocoon.agent.kmod import LateModules
from cocoon.agent.logbuf import LogBuffer
from cocoon.agent.proc import Reaper
from cocoon.agent.server import AgentService

log = logging.getLogger("cocoon.agent")

HANDLED = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT, signal.SIGPWR, signal.SIGHUP}


def power_off() -> None:
    os.sync()
    if os.getpid() != 1:
        log.info("not PID 1: exiting instead of powering off")
        os._exit(0)
    try:
        libc.reboot(libc.RB_POWER_OFF)
    except OSError as exc:
        log.error("power off: %s", exc)
    os._exit(1)  # only reached if reboot(2) failed


def kernel_cmdline(path: Path = Path("/proc/cmdline")) -> dict[str, str]:
    """``cocoon.KEY=VALUE`` parameters from the kernel command line."""
    try:
        words = path.read_text().split()
    except OSError:
        return {}
    out = {}
    for w in words:
        if w.startswith("cocoon."):
            k, _, v = w[len("cocoon.") :].partition("=")
            out[k] = v
    return out


@dataclass
class Args:
    socket: str = "/run/cocoon-agent/agent.sock"
    port: str = ""  # the virtio-serial port device (default: found by name)
    debug: bool = False


def parse_args(argv: list[str], params: dict[str, str]) -> Args:
    """``--socket PATH``, ``--port DEV``, ``--debug`` (argparse costs ~0.2 s of the boot
    under TCG, for three flags nobody but tests passes)."""
    args = Args(debug=params.get("debug") == "1")
    it = iter(argv)
    for word in it:
        name, eq, value = word.partition("=")
        if name == "--debug" and not eq:
            args.debug = True
        elif name in ("--socket", "--port"):
            value = value if eq else next(it, "")
            if not value:
                raise SystemExit(f"cocoon-agent: {name} needs a value")
            setattr(args, name[2:], value)
        else:
            raise SystemExit(f"cocoon-agent: unknown argument {word!r}")
    return args


def main(argv: list[str] | None = None) -> int:
    params = kernel_cmdline()
    args = parse_args(sys.argv[1:] if argv is None else argv, params)

    logs = LogBuffer()
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter("cocoon-agent: %(levelname)s %(message)s"))
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO, handlers=[console, logs]
    )

    signal.pthread_sigmask(signal.SIG_BLOCK, HANDLED)
    try:  # as runc does for a new network namespace: containers that share the guest's see it
        network.loopback_up()
    except OSError as exc:
        log.warning("lo: %s", exc)
    reaper = Reaper()
    manager = Manager(reaper)
    modules = LateModules()

    Path(args.socket).parent.mkdir(parents=True, exist_ok=True)
    if os.path.exists(args.socket):
        os.unlink(args.socket)

    port = Path(args.port) if args.port else channel.find_serial_port()
    vsock = channel.has_vsock_device()
    kinds = (["virtio-serial"] if port else []) + (["vsock"] if vsock else [])
    if not kinds:
        log.error(
            "no host channel: neither virtio-serial port %s nor /dev/vsock", channel.PORT_NAME
        )
        power_off()
    service = AgentService(
        logs, channel="+".join(kinds), poweroff=power_off, containers=manager, modules=modules
    )
    # Each process holds a few long calls (stdout, stderr, stdin, wait): size for many.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=256))
    pbg.add_AgentServiceServicer_to_server(service, server)
    server.add_insecure_port(f"unix:{args.socket}")
    server.start()

    def run(target: object, name: str) -> None:
        def guarded() -> None:
            try:
                target()  # type: ignore[operator]
            except Exception:
                log.exception("%s channel failed; powering off", name)
                power_off()

        threading.Thread(target=guarded, name=name, daemon=True).start()

    if port:
        mux = channel.SerialMux(port, args.socket, streams=manager.stream_fd)
        run(mux.serve_forever, "virtio-serial")
    if vsock:
        raw = channel.listen_vsock()  # listening before the agent says it is ready
        run(lambda: channel.serve_vsock(args.socket), "vsock")
        run(lambda: channel.serve_raw(raw, manager.stream_fd), "vsock-raw")
    service.mark_ready()
    modules.start()  # what the first stage left out, while the host works on its side
    log.info(
        "agent ready on %s (pid %d) at %.2fs uptime (deferred, not imported: %s)",
        "+".join(kinds),
        os.getpid(),
        service.ready_uptime,
        ", ".join(deferred.pending()) or "none",
    )

    while True:
        sig = signal.sigwait(HANDLED)
        if sig == signal.SIGCHLD:
            reaper.reap()
        else:
            log.info("got %s: powering off", signal.Signals(sig).name)
            server.stop(1)
            power_off()
