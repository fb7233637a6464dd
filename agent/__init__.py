"""cocoon.agent: the in-guest agent and the host<->guest contract.

What lives here: agent.proto and its generated code (the only host<->guest contract), the
framed multiplexer codec both sides speak over virtio-serial (``mux``), and the agent itself
(``server``, ``channel``, ``guest``, ``pid1``), which runs inside the guest as PID 1.

May import: the standard library, grpc, google.protobuf, and (in the guest) pyudev and
pyroute2. Must never import cocoon.runtime or cocoon.shim: this package is copied into the
guest image on its own.
"""

AGENT_VERSION = "0.1.0"


def api_hash() -> str:
    """sha256 of the agent.proto shipped beside this file; host and guest compare them."""
    import hashlib
    from pathlib import Path

    return hashlib.sha256((Path(__file__).parent / "agent.proto").read_bytes()).hexdigest()
