"""structlog set-up: readable on a terminal, JSON in deployments."""

from __future__ import annotations

import logging
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}
_debug = False


def debug_enabled() -> bool:
    """Whether debug events are logged: a per-job debug line's fields need not be built
    otherwise (a structlog call that drops its event still costs its arguments)."""
    return _debug


def configure_logging(
    fmt: str = "console", level: str = "info", static: dict[str, str] | None = None, *, final: bool = True
) -> None:
    """Configure structlog for the whole process; log lines go to stderr.

    ``static`` fields go on every line that does not set them itself: a node process
    has one identity, so its ``peer_id`` is on every line it logs, from every thread.
    ``final`` lets loggers resolve their configuration once, on first use (every job
    logs its terminal status, so this is on the hot path); a provisional configuration
    (before the config file is read) passes False so that it is not frozen in.
    """
    global _debug
    _debug = _LEVELS[level] <= logging.DEBUG
    renderer: structlog.typing.Processor
    if fmt == "json":
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    fields = dict(static or {})

    def add_static(logger: Any, method: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
        for key, value in fields.items():
            event_dict.setdefault(key, value)
        return event_dict

    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            add_static,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=final,
    )
    # Libraries underneath (pykka, multiprocessing, pyzmq's authenticator) log through the
    # standard library: send their records through the same renderer.
    root = logging.getLogger()
    root.handlers[:] = [_StdlibToStructlog()]
    root.setLevel(_LEVELS[level])
    pykka_log = logging.getLogger("pykka")
    if not any(isinstance(f, _ExceptionReturnedToCaller) for f in pykka_log.filters):
        pykka_log.addFilter(_ExceptionReturnedToCaller())


class _ExceptionReturnedToCaller(logging.Filter):
    """Drops pykka's info record of an exception that an actor method raised to its asker
    ("Exception returned from ... to caller", with its traceback): the asker gets the
    exception and handles or reports it. A node whose API endpoint is taken printed 20
    lines of traceback from it before its one-line error. Exceptions that end an actor
    (an error record) still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.levelno == logging.INFO and record.exc_info)


class _StdlibToStructlog(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        fields: dict[str, Any] = {"logger": record.name}
        if record.exc_info:
            fields["exc_info"] = record.exc_info
        structlog.get_logger(record.name).log(record.levelno, record.getMessage(), **fields)
