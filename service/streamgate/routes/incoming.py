"""A chat request as it comes in: its id, its body read within limits, then validated once.

Everything here happens before anything is relayed: each failure is an InvalidRequest whose
status and message become the client's 4xx (chat_request.py holds the body's rules).
"""

from __future__ import annotations

import asyncio
import re
import uuid

from ..chat_request import ChatRequest, InvalidRequest, parse_chat_request
from ..settings import Settings

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:\-]{1,128}")
# A body may be this many bytes per allowed prompt character (JSON escapes take up to 6),
# plus room for the other fields.
_BODY_BYTES_PER_CHAR = 6
_BODY_BYTES_SLACK = 65536


class ClientGone(Exception):
    """The client left before its request body arrived: nobody to answer."""


def request_id(scope) -> bytes:
    """The client's X-Request-ID if it is a safe token, else a new one."""
    for name, value in scope["headers"]:
        if name == b"x-request-id":
            if _REQUEST_ID.fullmatch(value.decode("latin-1")):
                return value
            break
    return uuid.uuid4().hex.encode()


async def read_chat_request(receive, settings: Settings, format_name: str) -> ChatRequest:
    """The request body, read within its deadline and size, parsed and validated."""
    limit = settings.max_prompt_chars * _BODY_BYTES_PER_CHAR + _BODY_BYTES_SLACK
    try:
        async with asyncio.timeout(settings.request_body_timeout_s):
            body = await _read_body(receive, limit)
    except TimeoutError:
        raise InvalidRequest("request body not received in time", status=408) from None
    if body is None:
        raise InvalidRequest("request body too large", status=413)
    return parse_chat_request(body, settings, format_name)


async def _read_body(receive, limit: int) -> bytes | None:
    """The whole request body, or None when it is over `limit` bytes."""
    message = await receive()
    body = message.get("body", b"")
    if not message.get("more_body", False):
        return body if len(body) <= limit else None
    parts = [body]
    size = len(body)
    while message.get("more_body", False):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        parts.append(chunk)
    return b"".join(parts)
