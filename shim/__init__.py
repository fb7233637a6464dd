"""cocoon.shim: the per-container (and per ``exec``) host process; its pid stands for the workload.

``main`` holds the caller's stdio or pty, proxies it to the agent's process streams through
the sandbox monitor, forwards every signal it receives and the window size, and exits with the
workload's status. The runtime starts it (cocoon.runtime.container.shim) as a child of the
caller, so subreaping callers (containerd-shim, conmon) reap it.

May import: the standard library, cocoon.agent.libc, cocoon.runtime.fds. Must stay light:
there is one shim per container process (main.py's docstring says what it imports and why).
"""
