"""cocoon.runtime.sandbox: one VM under one monitor, seen from the CLI's side.

``hostcheck`` probes what the host can do (accel, channel); ``qemu_argv`` is QEMU's command
line as a pure function of a plan; ``launcher`` starts and stops a sandbox (the launch file,
the monitor process, its ready report); ``client`` reaches a running monitor's socket;
``hostmount`` makes and removes the bind mounts of the sandbox's shared directory.

May import: the standard library, grpc, cocoon.agent (stubs, libc), cocoon.guest_image,
cocoon.runtime.{errors, config, vm_pb2*, monitor.launch, container.ids, container.state,
network (lazily)}.
"""
