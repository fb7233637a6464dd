"""cocoon.runtime.pod: which sandbox (VM) a container belongs to.

``membership`` reads the callers' pod annotations (containerd's CRI plugin, CRI-O and podman,
dockershim): a pod's sandbox container boots the pod's VM, a container that names its sandbox
joins that VM, anything else gets a VM of its own; and it maps a member's host namespace paths
(``/proc/<sandbox pid>/ns/*``, or the sandbox's pinned paths) to the sandbox container's
namespaces in the guest. The rest of the pods issue (the pod's shared files, sizing the VM for
all of its containers, host cgroups) lands here too.

May import: the standard library, cocoon.runtime.{errors, container.ids, container.spec}.
"""
