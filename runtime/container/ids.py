"""Container and sandbox ids: what runc accepts, nothing that can escape the state root.

May import: the standard library, cocoon.runtime.errors.
"""

from __future__ import annotations

import os
import re

from cocoon.runtime.errors import StateError

# A container's state lives in a directory named by its id: NAME_MAX (bytes) bounds it.
MAX_ID_LEN = 255
_ID = re.compile(r"[\w+\-.]+")


def validate_id(cid: str, what: str = "container") -> str:
    if not cid:
        raise StateError(f"invalid {what} id: it is empty")
    if len(os.fsencode(cid)) > MAX_ID_LEN:
        raise StateError(f"invalid {what} id: longer than {MAX_ID_LEN} bytes")
    if cid in (".", "..") or not _ID.fullmatch(cid):
        raise StateError(
            f"invalid {what} id {cid!r}: use letters, digits, '_', '+', '-' and '.' only"
        )
    return cid
