"""cocoon.runtime.resources: what a container asks the VM to hold.

``sizing`` turns the spec's CPU and memory into the VM's size; ``devices`` checks the host
devices of ``linux.devices`` (block devices, VFIO groups); ``attach`` asks the monitor to
resize the VM and hot-plug or unplug those devices on a container's behalf.

May import: the standard library, cocoon.runtime.{errors, config, container.spec,
sandbox.client}.
"""
