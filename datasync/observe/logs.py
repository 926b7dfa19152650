"""Logs: one handler for every datasync process, and the events as structured records.

``setup_logging`` installs one stderr handler on the root logger: JSON lines (``ts``,
``level``, ``logger``, ``pid``, ``msg``, ``action`` and the event's fields) or a human
format for terminals. The level is the argument, else ``DATASYNC_LOG`` (``DEBUG``,
``INFO``, ...), else the caller's default; the format the argument, else
``DATASYNC_LOG_FORMAT`` (``json``, ``human``, ``auto``), where ``auto`` means human on a
terminal and JSON elsewhere. Both are read when it is called, never at import.
Chatty third-party loggers (SDKs, the scheduler, uvicorn's access log) stay at WARNING
unless the level is DEBUG.

``EventLog`` is an event subscriber: every domain event becomes one record whose
``action`` key is stable (``ACTIONS``: ``task.claimed``, ``chunk.verified``,
``view.published``, ...), at a level that says whether someone should look. URLs in
event fields are redacted, as everywhere else.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import sys
from datetime import UTC, datetime
from typing import Any, Literal

from datasync.backends.registry import redact
from datasync.events import (
    BlobReplicated,
    ChunkVerified,
    Event,
    LabelMoved,
    LabelsSynced,
    PlacementCreated,
    PlacementDamaged,
    PlacementFailed,
    PlacementPlanned,
    PlacementPublishing,
    PlacementReady,
    PlacementReopened,
    ReplicaMarkedBad,
    SiteHeld,
    SitePaused,
    SiteResumed,
    TaskClaimed,
    TaskCompleted,
    TaskFailed,
    TaskRetried,
    VersionRegistered,
)
from datasync.observe.lookup import Lookup

__all__ = [
    "ACTIONS",
    "EventLog",
    "LogFormat",
    "current_logging",
    "reset_logging",
    "setup_logging",
]

LogFormat = Literal["auto", "json", "human"]

ACTIONS: dict[type[Event], tuple[str, int]] = {
    VersionRegistered: ("version.registered", logging.INFO),
    LabelMoved: ("label.moved", logging.INFO),
    LabelsSynced: ("labels.synced", logging.INFO),
    PlacementCreated: ("placement.created", logging.INFO),
    PlacementPlanned: ("placement.planned", logging.INFO),
    PlacementPublishing: ("view.publishing", logging.INFO),
    PlacementReady: ("view.published", logging.INFO),
    PlacementFailed: ("placement.failed", logging.ERROR),
    PlacementDamaged: ("placement.damaged", logging.ERROR),
    PlacementReopened: ("placement.reopened", logging.INFO),
    TaskClaimed: ("task.claimed", logging.DEBUG),
    TaskCompleted: ("task.completed", logging.INFO),
    TaskRetried: ("task.retried", logging.WARNING),
    TaskFailed: ("task.failed", logging.ERROR),
    BlobReplicated: ("blob.replicated", logging.DEBUG),
    ChunkVerified: ("chunk.verified", logging.DEBUG),
    ReplicaMarkedBad: ("replica.marked_bad", logging.WARNING),
    SitePaused: ("site.down", logging.WARNING),
    SiteHeld: ("site.paused", logging.WARNING),
    SiteResumed: ("site.resumed", logging.INFO),
}

_QUIET = (
    "alembic",
    "apscheduler",
    "azure",
    "boto3",
    "botocore",
    "google",
    "httpx",
    "s3transfer",
    "urllib3",
)
_QUIET_UNLESS_DEBUG = ("uvicorn.access",)
# Record attributes that are not extra fields (uvicorn adds a terminal-coloured copy).
_STANDARD = frozenset(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}

event_log = logging.getLogger("datasync.events")


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
            "msg": record.getMessage(),
        }
        extra = _extra(record)
        fields = extra.pop("event", None)
        doc.update(extra)
        if isinstance(fields, dict):  # an event's fields, flattened beside the record's own
            doc.update({k: v for k, v in fields.items() if k not in doc})
        if record.exc_info:
            doc["exc"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str, ensure_ascii=False)


class HumanFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")


def _extra(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (test runners swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:
            self.handleError(record)


@dataclasses.dataclass(frozen=True, slots=True)
class LoggingSetup:
    level: int
    fmt: Literal["json", "human"]


_current: list[LoggingSetup] = []


def current_logging() -> LoggingSetup | None:
    """What ``setup_logging`` last installed in this process (for spawned workers)."""
    return _current[-1] if _current else None


def _level(value: str | int | None, default: int) -> int:
    value = value if value not in (None, "") else os.environ.get("DATASYNC_LOG") or default
    if isinstance(value, int):
        return value
    number = logging.getLevelName(value.strip().upper())
    if not isinstance(number, int):
        raise ValueError(f"unknown log level {value!r}: use DEBUG, INFO, WARNING or ERROR")
    return number


def setup_logging(
    level: str | int | None = None,
    fmt: LogFormat | str | None = None,
    *,
    default_level: int = logging.WARNING,
) -> LoggingSetup:
    """Install the datasync handler on the root logger (replacing one installed before)."""
    chosen = _level(level, default_level)
    wanted = fmt or os.environ.get("DATASYNC_LOG_FORMAT") or "auto"
    if wanted not in ("auto", "json", "human"):
        raise ValueError(f"unknown log format {wanted!r}: use json, human or auto")
    if wanted == "auto":
        wanted = "human" if sys.stderr.isatty() else "json"
    handler = _StderrHandler()
    handler.setFormatter(JsonFormatter() if wanted == "json" else HumanFormatter())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(chosen)
    for name in _QUIET:
        logging.getLogger(name).setLevel(max(chosen, logging.WARNING))
    for name in _QUIET_UNLESS_DEBUG:
        logging.getLogger(name).setLevel(chosen if chosen <= logging.DEBUG else logging.WARNING)
    setup = LoggingSetup(chosen, "json" if wanted == "json" else "human")
    _current[:] = [setup]
    return setup


def reset_logging() -> None:
    """Undo ``setup_logging``: the root logger as a new process has it (tests that run
    commands in-process need this between them)."""
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StderrHandler)]:
        root.removeHandler(old)
    root.setLevel(logging.WARNING)
    _current.clear()


class EventLog:
    """Subscriber: one log record per domain event, with a stable ``action`` key."""

    def __init__(self, lookup: Lookup) -> None:
        self.lookup = lookup

    def __call__(self, event: Event) -> None:
        spec = ACTIONS.get(type(event))
        if spec is None:
            return
        action, level = spec
        if not event_log.isEnabledFor(level):
            return  # no lookups for records nobody keeps
        fields = {
            f.name: _safe(getattr(event, f.name))
            for f in dataclasses.fields(event)
            if f.name != "at"
        }
        placement_id = fields.get("placement_id")
        if isinstance(placement_id, int) and "site" not in fields:
            info = self.lookup.placement(placement_id)
            fields["ref"], fields["site"] = info.ref, info.site
        text = " ".join(f"{k}={_short(v)}" for k, v in fields.items())
        event_log.log(level, "%s %s", action, text, extra={"action": action, "event": fields})


def _safe(value: Any) -> Any:
    """URLs with their passwords and signatures masked (a registration source may be one)."""
    return redact(value) if isinstance(value, str) and "://" in value else value


def _short(value: Any) -> str:
    if isinstance(value, datetime):
        return value.isoformat(timespec="seconds")
    text = str(value)
    return repr(text) if " " in text else text
