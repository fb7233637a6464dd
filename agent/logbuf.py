"""A bounded in-memory log the host can read (ReadLogs) besides the console.

May import: the standard library only.
"""

from __future__ import annotations

import collections
import logging
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Record:
    seq: int
    time: float
    level: str
    message: str


class LogBuffer(logging.Handler):
    def __init__(self, capacity: int = 2000) -> None:
        super().__init__()
        self._records: collections.deque[Record] = collections.deque(maxlen=capacity)
        self._cond = threading.Condition()
        self._seq = 0

    def emit(self, record: logging.LogRecord) -> None:
        msg = f"{record.name}: {record.getMessage()}"
        with self._cond:
            self._seq += 1
            self._records.append(Record(self._seq, record.created, record.levelname.lower(), msg))
            self._cond.notify_all()

    def records(self, follow: bool, alive: Callable[[], bool]) -> Iterator[Record]:
        last = 0
        while True:
            with self._cond:
                batch = [r for r in self._records if r.seq > last]
                if not batch:
                    if not follow or not alive():
                        return
                    self._cond.wait(timeout=1.0)
                    continue
            yield from batch
            last = batch[-1].seq
