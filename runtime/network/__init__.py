"""cocoon.runtime.network: the container's network namespace, bridged to guest NICs.

``netns`` enters, makes and removes network namespaces and opens netlink; ``scan`` reads a
namespace's interfaces; ``models`` bridges each interface to tap fds for a guest NIC
(tcfilter, macvtap, the benchmark's tap); ``record`` writes down what was made and undoes it,
also from a later process. The endpoint kind (what is in the namespace) and the network model
(how it is bridged) stay two separate axes, as in Kata's runtime-rs.

May import: the standard library, pyroute2, cocoon.agent.libc, cocoon.runtime.errors.
"""
