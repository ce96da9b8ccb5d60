"""
Where log events go and which of them are kept.

pgdoorman logs through Twisted's logger everywhere (a class-level C{log = Logger()}); this
module only decides the output side:

  - L{text_observer}: one line per event for a person, C{TIME LEVEL [namespace] message}.
  - L{json_observer}: "structured" output for log shippers, one JSON object per line with
    C{time}, C{level}, C{message}, C{namespace} and the event's own fields.
  - one process-wide level filter, changed with L{set_level} (by C{-l}, C{LOG_LEVEL}, a reload
    on SIGHUP or the admin console's C{SET log_level}) and read with L{get_level}.
  - L{reopen}: log files opened here are reopened (SIGHUP after logrotate moved them).

Field values whose names say they are secrets (password, secret, token, ...) are never
written: the structured observer replaces them with C{"***"}.
"""

from __future__ import annotations

import io
import json
import os
import sys
import time
from typing import IO, Callable, Dict, List, Optional

from twisted.logger import (FilteringLogObserver, ILogObserver, LogLevel,
                            LogLevelFilterPredicate, formatEvent, globalLogBeginner)
from twisted.python.failure import Failure
from zope.interface import implementer

__all__ = ["LEVELS", "FORMATS", "level_name", "parse_level", "set_level", "get_level",
           "text_observer", "json_observer", "syslog_observer", "LogFile", "start", "reopen"]

#: The names C{-l}, C{LOG_LEVEL} and C{SET log_level} accept (PgDoorman's, plus Twisted's),
#: and the Twisted level each means.  Twisted has no "trace": it is debug.
LEVELS: Dict[str, LogLevel] = {
    "trace": LogLevel.debug,
    "debug": LogLevel.debug,
    "info": LogLevel.info,
    "warn": LogLevel.warn,
    "warning": LogLevel.warn,
    "error": LogLevel.error,
    "critical": LogLevel.critical,
}

FORMATS = ("text", "structured")

#: Field names (lower-cased substrings) that are never written by the structured observer.
SECRET_FIELDS = ("password", "secret", "token", "passwd", "private_key")

_predicate = LogLevelFilterPredicate(defaultLogLevel=LogLevel.info)
_files: List["LogFile"] = []


def parse_level(name: str) -> LogLevel:
    """
    The Twisted level for a level name (case insensitive).

    @raise ValueError: not one of L{LEVELS}; the message lists the valid names.
    """
    try:
        return LEVELS[name.strip().lower()]
    except (KeyError, AttributeError):
        raise ValueError("unknown log level %r (use one of: %s)"
                         % (name, ", ".join(n for n in LEVELS if n != "warning")))


def level_name(level: LogLevel) -> str:
    """PgDoorman's spelling of a Twisted level: info, debug, warn, error, critical."""
    return level.name


def set_level(name: str) -> LogLevel:
    """
    Change the level of every observer started by L{start}, at once and process-wide.

    @raise ValueError: unknown level name (the level is left as it was).
    """
    level = parse_level(name)
    _predicate.setLogLevelForNamespace(None, level)
    return level


def get_level() -> str:
    """The current level's name (for C{SHOW LOG_LEVEL})."""
    return level_name(_predicate.logLevelForNamespace(None))


def _timestamp(event: dict) -> str:
    when = event.get("log_time") or time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(when)) + (
        ".%03d" % (int(when * 1000) % 1000)) + time.strftime("%z", time.localtime(when))


def _message(event: dict) -> str:
    text = formatEvent(event)
    failure = event.get("log_failure")
    if isinstance(failure, Failure):
        text = "%s\n%s" % (text, failure.getTraceback().rstrip())
    return text


def _write_line(stream: IO[str], line: str) -> None:
    try:
        stream.write(line + "\n")
        stream.flush()
    except (OSError, ValueError):
        pass  # a closed or full log destination must not take the pooler down


def text_observer(stream: IO[str]) -> ILogObserver:
    """
    One line per event: C{2024-05-01T12:00:00.123+0000 INFO [pgdoorman.client] message}.
    Continuation lines (tracebacks) are indented by a tab.
    """

    @implementer(ILogObserver)
    def observe(event: dict) -> None:
        level = event.get("log_level", LogLevel.info)
        line = "%s %s [%s] %s" % (_timestamp(event), level.name.upper(),
                                  event.get("log_namespace", "-"),
                                  _message(event).replace("\n", "\n\t"))
        _write_line(stream, line)

    return observe


def _jsonable(value: object) -> object:
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _is_secret(name: str) -> bool:
    lowered = name.lower()
    return any(word in lowered for word in SECRET_FIELDS)


def json_observer(stream: IO[str]) -> ILogObserver:
    """
    Structured output: one JSON object per line.  Keys: C{time} (ISO 8601 with milliseconds
    and the UTC offset), C{level}, C{message}, C{namespace}, then the event's own fields (not
    Twisted's C{log_*} bookkeeping), with secret-looking fields replaced by C{"***"}.
    """

    @implementer(ILogObserver)
    def observe(event: dict) -> None:
        level = event.get("log_level", LogLevel.info)
        record = {"time": _timestamp(event), "level": level.name,
                  "message": _message(event),
                  "namespace": event.get("log_namespace", "-")}
        for key, value in event.items():
            if key.startswith("log_") or key in record or key in ("format", "message"):
                continue
            record[key] = "***" if _is_secret(key) else _jsonable(value)
        _write_line(stream, json.dumps(record, ensure_ascii=False, separators=(",", ":")))

    return observe


def syslog_observer(prog_name: str, fmt: str = "text") -> ILogObserver:
    """
    Send events to the local syslog under C{prog_name} (daemon mode with
    C{general.syslog_prog_name}).
    """
    import syslog

    syslog.openlog(prog_name, syslog.LOG_PID, syslog.LOG_DAEMON)
    priorities = {LogLevel.debug: syslog.LOG_DEBUG, LogLevel.info: syslog.LOG_INFO,
                  LogLevel.warn: syslog.LOG_WARNING, LogLevel.error: syslog.LOG_ERR,
                  LogLevel.critical: syslog.LOG_CRIT}
    lines: List[str] = []
    inner = json_observer(_ListStream(lines)) if fmt == "structured" else None

    @implementer(ILogObserver)
    def observe(event: dict) -> None:
        priority = priorities.get(event.get("log_level"), syslog.LOG_INFO)
        if inner is not None:
            inner(event)
            text = lines.pop() if lines else ""
        else:
            text = "[%s] %s" % (event.get("log_namespace", "-"), _message(event))
        for line in text.splitlines() or [""]:
            syslog.syslog(priority, line)

    return observe


class _ListStream(io.StringIO):
    def __init__(self, lines: List[str]) -> None:
        io.StringIO.__init__(self)
        self._lines = lines

    def write(self, s: str) -> int:
        if s.strip():
            self._lines.append(s.rstrip("\n"))
        return len(s)


class LogFile(io.TextIOBase):
    """
    An append-mode text file that L{reopen} reopens by name, so that logrotate can move it
    away and the next line goes to a fresh file (no C{copytruncate} needed).
    """

    def __init__(self, path: str) -> None:
        io.TextIOBase.__init__(self)
        self.path = path
        self._file = self._open()
        _files.append(self)

    def _open(self) -> IO[str]:
        return open(self.path, "a", encoding="utf-8", errors="replace")

    def write(self, s: str) -> int:  # type: ignore[override]
        return self._file.write(s)

    def flush(self) -> None:
        self._file.flush()

    def reopen(self) -> None:
        old, self._file = self._file, self._open()
        try:
            old.close()
        except OSError:
            pass

    def fileno(self) -> int:
        return self._file.fileno()


def reopen() -> None:
    """Reopen every log file opened by L{start} (call it on SIGHUP)."""
    for f in _files:
        try:
            f.reopen()
        except OSError:
            pass


def make_observer(fmt: str = "text", stream: Optional[IO[str]] = None,
                  syslog_name: Optional[str] = None) -> ILogObserver:
    """
    The observer for C{fmt} ("text" or "structured") writing to C{stream} (default stderr)
    or, with C{syslog_name}, to syslog.  Not filtered: L{start} adds the level filter.
    """
    if fmt not in FORMATS:
        raise ValueError("unknown log format %r (use text or structured)" % (fmt,))
    if syslog_name:
        return syslog_observer(syslog_name, fmt)
    stream = stream if stream is not None else sys.stderr
    return json_observer(stream) if fmt == "structured" else text_observer(stream)


def filtered(observer: ILogObserver) -> ILogObserver:
    """C{observer} behind the process-wide level filter that L{set_level} controls."""
    return FilteringLogObserver(observer, [_predicate])


def start(fmt: str = "text", level: str = "info", stream: Optional[IO[str]] = None,
          path: Optional[str] = None, syslog_name: Optional[str] = None,
          begin: Callable = globalLogBeginner.beginLoggingTo) -> ILogObserver:
    """
    Begin logging for the whole process: events at C{level} or above, in C{fmt}, to C{path}
    (a reopenable L{LogFile}), or syslog under C{syslog_name}, or C{stream} (default stderr).
    Standard output is not redirected.
    """
    set_level(level)
    if path:
        stream = LogFile(os.path.abspath(path))
    observer = filtered(make_observer(fmt, stream, syslog_name))
    begin([observer], redirectStandardIO=False)
    return observer
