"""Modules that are imported at the agent's start but only used, if ever, later: deferred.

grpc's package imports ``grpc.aio`` and its Cython core imports ``asyncio`` (and with it
``ssl`` and OpenSSL), though the agent serves gRPC with threads and never touches either.
Under TCG that was ~0.2 s of the agent's start and ~3 MiB of each guest's memory
(docs/performance.md). ``install`` puts a stand-in in ``sys.modules`` for each such name before
anything imports it: an ``import`` of the name gets the stand-in, and the first attribute read
from it imports the real module (which then replaces the stand-in in ``sys.modules``) and
forwards to it.

``importlib.util.LazyLoader`` is the standard library's version of this, but in Python 3.11
any ``import`` of a name already in ``sys.modules`` reads the module's ``__spec__``, which makes
a lazy module load: ``from grpc import aio`` would load it at once.

May import: the standard library.
"""

from __future__ import annotations

import importlib
import logging
import sys
import threading
import types

log = logging.getLogger("cocoon.agent")

_lock = threading.RLock()  # loading one may load another (grpc.aio imports asyncio)


class Deferred(types.ModuleType):
    """Stands in ``sys.modules`` for a module until something reads an attribute of it."""

    def __getattr__(self, attr: str) -> object:
        # Only called for attributes the stand-in itself lacks: ModuleType gives it __name__,
        # __doc__, __spec__ = None (so an import of the name takes it as loaded), __loader__
        # and __package__. Anything else, __path__ and __file__ included, is the real module's.
        return getattr(self.load(), attr)

    def load(self) -> types.ModuleType:
        """The real module, imported on the first call."""
        real: types.ModuleType | None = self.__dict__.get("_deferred_real")
        if real is not None:
            return real
        with _lock:
            real = self.__dict__.get("_deferred_real")
            if real is None:
                name = self.__name__
                if sys.modules.get(name) is self:
                    del sys.modules[name]
                try:
                    real = importlib.import_module(name)
                except BaseException:
                    sys.modules.setdefault(name, self)
                    raise
                self.__dict__["_deferred_real"] = real
                log.info("deferred module %s imported on first use", name)
        return real


def install(names: list[str]) -> list[Deferred]:
    """Stand-ins for ``names`` that nothing has imported yet (one already imported is left)."""
    out = []
    for name in names:
        if name in sys.modules:
            continue
        stand_in = Deferred(name)
        sys.modules[name] = stand_in
        out.append(stand_in)
    return out


def pending() -> list[str]:
    """The names still stood in for, never used so far."""
    return sorted(
        name
        for name, mod in list(sys.modules.items())
        if isinstance(mod, Deferred) and mod.__dict__.get("_deferred_real") is None
    )
