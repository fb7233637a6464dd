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


def _show(cid: str) -> str:
    """The id as the error quotes it: escaped, and cut short when it is long."""
    return repr(cid) if len(cid) <= 80 else repr(cid[:80]) + "..."


def validate_id(cid: str, what: str = "container") -> str:
    if not isinstance(cid, str):
        raise StateError(f"invalid {what} id: not a string ({type(cid).__name__})")
    if not cid:
        raise StateError(f"invalid {what} id: it is empty")
    try:
        size = len(os.fsencode(cid))
    except UnicodeEncodeError:  # a lone surrogate (JSON's "\ud800"): no file name
        size = -1
    if size > MAX_ID_LEN:
        raise StateError(f"invalid {what} id: longer than {MAX_ID_LEN} bytes")
    if size < 0 or cid in (".", "..") or not _ID.fullmatch(cid):
        raise StateError(
            f"invalid {what} id {_show(cid)}: use letters, digits, '_', '+', '-' and '.' only"
        )
    return cid
