"""cocoon.runtime.pod: which sandbox a container belongs to.

Today every container boots a VM of its own (the sandbox id is the container id). The pods
issue lands here: reading the CRI and CRI-O annotations that say "this is a pod's sandbox" or
"this container joins sandbox S", the pod's record, and sizing the pod's VM for all of its
containers.

May import: the standard library, cocoon.runtime.{errors, config, container.state,
container.ids}.
"""
