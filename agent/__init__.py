"""cocoon.agent: the in-guest agent and the host<->guest contract.

What lives here:

    agent.proto, agent_pb2*   the only host<->guest contract (gRPC), and its generated code
    mux                       the frame codec both ends speak over the virtio-serial port
    pid1                      the agent's main: PID 1 duties (signals, reaping, power-off)
    channel                   the guest end of the channel (virtio-serial mux, vsock relay)
    server                    the gRPC service; the agent's errors become status codes here
    containers                containers and their processes and stdio, run by crun
    specedit                  the guest's own edits to a container's spec (pure functions)
    devices                   hot-plugged CPUs, memory and devices
    network                   interfaces, routes, neighbours and identity (pyroute2)
    guest                     what the guest is (kernel, CPUs, memory) from /proc and /sys
    entropy                   reseeding the kernel's RNG from host bytes (a restored clone)
    kmod                      the kernel modules loaded after the agent serves
    proc                      spawning and reaping processes where the agent is PID 1
    mounts                    mounting in the guest
    logbuf                    the in-memory log the host reads (ReadLogs)
    libc                      the one libc seam (setns, unshare, mount, umount2, reboot,
                              finit_module),
                              which the host side imports too
    errors                    every error class of the agent, kinds as an Enum

The host side imports only the generated stubs, ``libc``, ``mux`` (and through it ``errors``: all
stay standard library only) and ``api_hash``; the guest image gets every file of this folder.

May import: the standard library, grpc, google.protobuf, pyudev (in the guest), pyroute2 (in
the guest), cocoon.agent. Must never import cocoon.runtime or cocoon.shim: this package is
copied into the guest image on its own.
"""

AGENT_VERSION = "0.1.0"


def api_hash() -> str:
    """sha256 of the agent.proto shipped beside this file; host and guest compare them."""
    import hashlib
    from pathlib import Path

    return hashlib.sha256((Path(__file__).parent / "agent.proto").read_bytes()).hexdigest()
