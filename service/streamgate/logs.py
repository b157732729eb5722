"""Structured logs: one JSON line per request. Secrets never reach here (see Settings)."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import orjson

ACCESS_LOGGER = logging.getLogger("streamgate.access")
# user:password@ in any URL an error message quotes (an upstream or proxy URL with credentials).
_URL_CREDENTIALS = re.compile(r"//[^/\s@]+@")
MAX_ERROR_CHARS = 1000
LOGGER = logging.getLogger("streamgate")


def configure(level: str) -> None:
    """JSON lines on stderr (journald under systemd, gunicorn's log otherwise)."""
    if not any(getattr(h, "_streamgate", False) for h in LOGGER.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._streamgate = True  # type: ignore[attr-defined]
        LOGGER.addHandler(handler)
    LOGGER.setLevel(level.upper())
    LOGGER.propagate = False


def log_event(event: str, **fields: Any) -> None:
    if LOGGER.isEnabledFor(logging.INFO):
        LOGGER.info(orjson.dumps({"event": event, **fields}, default=str).decode())


def log_request(scope, request_id: bytes, route: str, outcome) -> None:
    if not ACCESS_LOGGER.isEnabledFor(logging.INFO):
        return
    record = {
        "event": "request",
        "request_id": request_id.decode(),
        "route": route,
        "method": scope.get("method"),
        "client": outcome.client,
        "status": outcome.status,
        "outcome": outcome.outcome,
        "ttft_ms": None if outcome.ttft_s is None else round(outcome.ttft_s * 1000, 2),
        "tokens": outcome.tokens,
        "completion_tokens": (outcome.usage or {}).get("completion_tokens"),
        "finish_reason": outcome.finish_reason,
        "duration_ms": round(outcome.duration_s * 1000, 2),
    }
    if outcome.error:
        record["error"] = _URL_CREDENTIALS.sub("//***@", outcome.error[:MAX_ERROR_CHARS])
    ACCESS_LOGGER.info(orjson.dumps(record).decode())
