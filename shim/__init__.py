"""cocoon.shim: the per-container (and per ``exec --detach``) host process.

Not built yet: it arrives with the runc lifecycle (issue "The runc-compatible lifecycle").
Its job is fixed by docs/architecture.md: hold the caller's stdio or pty, proxy it to the
agent's process streams through the sandbox monitor, forward signals and window size, and exit
with the workload's status.

May import: the standard library, grpc, cocoon.agent (generated stubs). Must stay light: there
is one shim per container.
"""
