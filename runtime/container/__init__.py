"""cocoon.runtime.container: the container lifecycle behind runc's verbs.

``lifecycle`` does each verb's work (``create`` the longest, in named steps; ``execproc`` the
exec, without gRPC), over ``state``
(one flock'ed directory per container, the Status rules), ``ids``, ``spec`` (the OCI bundle,
checked once at the edge, and its rewrite for the guest), ``hooks`` (the host-side OCI hooks),
``shim`` (spawning a container's or an exec's shim and waiting for it) and ``busybox`` (the
embedded default bundle).

May import: the standard library, cocoon.runtime.{errors, config, logs, pod, sandbox, resources,
network, monitor.launch (the files a sandbox holds)}. Never cocoon.runtime.cli or the monitor's own
modules.
"""
