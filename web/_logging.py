"""Logging set-up: one JSON object a line (or plain text), for keepstream's and uvicorn's logs.

Records may carry ``generation_id``, ``session_id``, ``user`` and ``worker_id`` (pass them with
``extra=``); they become fields of the JSON object. Nothing logs API keys or prompt text.
"""

from __future__ import annotations

import logging
import logging.config
import time
from typing import Any

from ._json import encode_json

CONTEXT_FIELDS = ("generation_id", "session_id", "user", "worker_id", "status", "error_type")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JSONFormatter(logging.Formatter):
    """Formats a record as one line of JSON: time, level, logger, message and context."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for name in CONTEXT_FIELDS:
            value = record.__dict__.get(name)
            if value is not None:
                entry[name] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return encode_json(entry).decode()


def logging_config(level: str, fmt: str) -> dict[str, Any]:
    """A ``logging.config.dictConfig`` for keepstream and uvicorn at ``level`` in ``fmt``
    (``json`` or ``text``)."""
    formatter: dict[str, Any] = {"()": JSONFormatter} if fmt == "json" else {"format": TEXT_FORMAT}
    handler = {
        "class": "logging.StreamHandler",
        "formatter": "default",
        "stream": "ext://sys.stderr",
    }
    loggers = {
        name: {"handlers": ["default"], "level": level.upper(), "propagate": False}
        for name in ("keepstream", "uvicorn", "uvicorn.error", "uvicorn.access")
    }
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"default": formatter},
        "handlers": {"default": handler},
        "loggers": loggers,
    }


def configure_logging(level: str, fmt: str) -> dict[str, Any]:
    """Apply ``logging_config`` now and return it (for uvicorn's ``log_config``)."""
    config = logging_config(level, fmt)
    logging.config.dictConfig(config)
    return config
