"""cocoon.runtime: the host side of cocoon, one package per concern.

    cli/        the ``cocoon`` command: runc's grammar and verbs, and cocoon's own tools
    container/  the container lifecycle: the verbs' work, state on disk, ids, the OCI bundle,
                hooks, spawning shims
    pod/        which sandbox (VM) a container belongs to
    sandbox/    one VM under one monitor: host probe, QEMU's argv, launching, the client,
                the shared directory's mounts
    resources/  sizing the VM for a container and the host devices it asks for
    network/    the container's network namespace bridged to tap fds for guest NICs
    monitor/    the per-sandbox monitor process (QEMU, QMP, the agent link, the VM service)

Beside them: ``errors`` (every error class of the host side), ``config``, ``logs``, ``fds``, and the
VM service's contract (``vm.proto``, ``vm_pb2*``), which the monitor serves over gRPC and, to the
CLI, as framed JSON (monitor.calls, sandbox.client). The one libc seam is cocoon.agent.libc, shared
with the guest.

Imports point one way: cli -> container -> {pod, sandbox, resources, network} -> the shared
modules beside them; the monitor is its own process and imports none of cli, container, pod.

May import: nothing (a namespace docstring).
"""
