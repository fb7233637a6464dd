"""Logging set-up shared by the CLI and the monitor: runc-style JSON lines or plain text.

runc's callers read ``--log`` files whose lines look like
``{"level":"error","msg":"...","time":"2026-01-02T03:04:05Z"}``.

May import: the standard library only.
"""

from __future__ import annotations

import datetime
import json
import logging
from pathlib import Path


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        t = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        level = {"WARNING": "warning", "CRITICAL": "fatal"}.get(
            record.levelname, record.levelname.lower()
        )
        return json.dumps(
            {"level": level, "msg": record.getMessage(), "time": t.strftime("%Y-%m-%dT%H:%M:%SZ")}
        )


def setup(log_file: Path | None, fmt: str, debug: bool, stderr: bool = True) -> None:
    handlers: list[logging.Handler] = []
    if log_file is not None:
        fh = logging.FileHandler(log_file, encoding="utf-8", errors="backslashreplace")
        fh.setFormatter(
            JsonFormatter()
            if fmt == "json"
            else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
        handlers.append(fh)
    if stderr:
        sh = logging.StreamHandler()
        sh.setFormatter(logging.Formatter("%(name)s: %(levelname)s %(message)s"))
        sh.setLevel(logging.DEBUG if debug else logging.WARNING)
        handlers.append(sh)
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO, handlers=handlers, force=True
    )


def setup_monitor(log_file: Path | None, fmt: str, debug: bool) -> None:
    """A monitor's logging: the caller's log file, and everything at info level (debug with
    ``debug``) on stderr, which is the state dir's monitor.log."""
    setup(log_file, fmt, debug)
    logging.getLogger().handlers[-1].setLevel(logging.DEBUG if debug else logging.INFO)
