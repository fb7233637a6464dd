"""``python3 -m cocoon.agent``: the guest's PID 1 (see ``pid1``).

Before anything else it defers ``asyncio`` and ``grpc.aio``, which gRPC imports and the agent
never uses (see ``deferred``).

May import: the standard library, cocoon.agent.{deferred, pid1}.
"""

import sys

from cocoon.agent import deferred

deferred.install(["asyncio", "grpc.aio"])

from cocoon.agent.pid1 import main  # noqa: E402  (after the stand-ins)

sys.exit(main())
