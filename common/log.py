"""Logging for every role: structlog to stderr, JSON lines for machines, readable text on a terminal.

Standard-library log records (pyzmq's authenticator, transformers, ...) go through the same
renderer, so one process writes one format. Configuration may be repeated (tests, a supervisor that
re-configures after forking); the last call wins.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog
import structlog.tracebacks
from structlog.typing import EventDict, FilteringBoundLogger, Processor, WrappedLogger

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at emit time, so redirection after configuration still works."""

    def __init__(self) -> None:
        super().__init__()

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, _value: Any) -> None:
        pass


_handler_marker = "_at2po_handler"


def _role_adder(role: str) -> Processor:
    # A constant processor rather than contextvars: threads started later would not inherit those.
    def add_role(_logger: WrappedLogger, _method: str, event_dict: EventDict) -> EventDict:
        event_dict.setdefault("role", role)
        return event_dict

    return add_role


def configure_logging(level: str = "info", json_logs: bool | None = None, role: str | None = None) -> None:
    """Set up structlog and the stdlib root logger; JSON unless stderr is a TTY (when json_logs is None)."""
    try:
        numeric_level = _LEVELS[level.lower()]
    except KeyError:
        raise ValueError(f"logging level {level!r} is not one of {', '.join(_LEVELS)}") from None
    if json_logs is None:
        json_logs = not sys.stderr.isatty()

    shared: list[Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    if role is not None:
        shared.append(_role_adder(role))
    shared.append(structlog.processors.StackInfoRenderer())

    renderer: Processor
    if json_logs:
        renderer = structlog.processors.JSONRenderer()
        # No locals in tracebacks: they are bulky and may hold secrets (key material, tokens).
        tracebacks = structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        )
        final: list[Processor] = [tracebacks, renderer]
    else:
        colors = sys.stderr.isatty()
        renderer = structlog.dev.ConsoleRenderer(
            colors=colors,
            exception_formatter=(
                structlog.dev.RichTracebackFormatter(show_locals=False) if colors else structlog.dev.plain_traceback
            ),
        )
        final = [renderer]

    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *final],
    )
    handler = _StderrHandler()
    setattr(handler, _handler_marker, True)
    handler.setFormatter(formatter)

    root = logging.getLogger()
    for old in [h for h in root.handlers if getattr(h, _handler_marker, False)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(numeric_level)

    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.stdlib.LoggerFactory(),
        context_class=dict,
        # Not cached, so loggers created at import time follow a later (re)configuration.
        cache_logger_on_first_use=False,
    )


def get_logger(name: str) -> FilteringBoundLogger:
    """A structlog logger named `name`; safe to create at import time, before configure_logging."""
    logger: FilteringBoundLogger = structlog.get_logger(name)
    return logger
