"""cocoon.runtime.monitor: the per-sandbox monitor process and what it is made of.

The monitor owns one VM: it launches QEMU (and virtiofsd), holds QMP through qemu.qmp and
the single agent connection, forwards the agent's gRPC service to local clients on
``<state>/monitor.sock`` next to its own VM service, notices QEMU's death, and shuts down in
order (agent power-off, QMP quit, SIGKILL).

May import: the standard library, grpc, qemu.qmp, cocoon.agent (proto, mux),
cocoon.runtime.{vm_pb2, vm_pb2_grpc, logs}. Must not import the CLI.
"""
