"""``python3 -m cocoon.agent``: the guest's PID 1 (see ``pid1``).

May import: the standard library, cocoon.agent.pid1.
"""

import sys

from cocoon.agent.pid1 import main

sys.exit(main())
