"""``python3 -m cocoon.agent``: the guest's PID 1."""

import sys

from cocoon.agent.pid1 import main

sys.exit(main())
