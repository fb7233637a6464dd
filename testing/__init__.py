"""cocoon.testing: VM-isolated containers for a test suite (the pytest plugin and its API).

May import: cocoon.testing.harness.
"""

from cocoon.testing.harness import (
    Cocoon,
    CocoonTestError,
    Container,
    ExecResult,
    Pod,
)

__all__ = ["Cocoon", "CocoonTestError", "Container", "ExecResult", "Pod"]
