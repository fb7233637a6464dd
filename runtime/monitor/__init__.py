"""cocoon.runtime.monitor: the per-sandbox monitor process and what it is made of.

The monitor owns one VM: it launches QEMU (and virtiofsd), holds QMP through qemu.qmp and
the single agent connection, forwards the agent's gRPC service to local clients on
``<state>/monitor.sock`` next to its own VM service, notices QEMU's death, and shuts down in
order (agent sync and power-off, QMP quit, SIGKILL).

main (the entry point) -> vm (processes, QMP, agent link, teardown), service (the VM
service's RPCs, one table) -> netattach (networking), hotplug (devices over QMP) ->
agentcalls (the monitor's agent RPCs), channel (the agent link), forward (the agent service,
passed through); launch is the launch contract the launcher writes (standard library only);
forkserver forks the monitors of a state root from one process that imported main once.
The monitor must not import the CLI, cocoon.runtime.container or cocoon.runtime.pod.

May import: the standard library only.
"""
