"""cocoon.runtime.sandbox: one VM under one monitor, seen from the CLI's side.

``hostcheck`` probes what the host can do (accel, channel); ``qemu_argv`` is QEMU's command line as
a pure function of a plan; ``launcher`` starts and stops a sandbox (the launch file, the monitor
process, its ready report); ``client`` calls a running monitor (JSON over its socket, no gRPC);
``hostmount`` makes and removes the bind mounts of the sandbox's shared directory.

May import: the standard library, cocoon.agent (libc), cocoon.guest_image,
cocoon.runtime.{errors, config, monitor.launch, container.ids, container.state,
network (lazily)}.
"""
