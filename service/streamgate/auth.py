"""Client keys: who may use the chat routes, checked once per request before its body is read.

STREAMGATE_CLIENT_KEY_HASHES lists named keys as `name:sha256hex`, comma-separated, e.g.
`web:9f86d0…,batch:2c26b4…` (the hex is SHA-256 of the key as the client sends it, 64 digits;
`printf %s "$KEY" | sha256sum`). Hosts hold only these hashes, never a key. Empty (the
default): no key is asked for, as for `make run` on loopback.

A request sends `Authorization: Bearer <key>`. The key is hashed once and compared in constant
time (hmac.compare_digest) with every configured hash, all of them, whatever matched first, so
the time taken tells nothing about which name (or how many) a key came close to. Several names
make rotation possible without downtime: add the new key, move the clients, remove the old one
(each step an env file change and a `systemctl reload`). The matching name goes to the access
log as `client`; the key and its hash go nowhere.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping

SETTING = "STREAMGATE_CLIENT_KEY_HASHES"
NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SHA256_HEX = re.compile(r"[0-9a-fA-F]{64}")
# RFC 6750: the challenge a 401 carries; `error="invalid_token"` when a key was sent.
CHALLENGE_MISSING = b'Bearer realm="streamgate"'
CHALLENGE_INVALID = b'Bearer realm="streamgate", error="invalid_token"'


def parse_key_hashes(text: str) -> dict[str, str]:
    """`name:sha256hex,...` -> {name: lowercase hex}. A bad entry raises ValueError that names
    the setting and the entry's position (never its text: a key pasted by mistake stays out of
    the log)."""
    hashes: dict[str, str] = {}
    seen: set[str] = set()
    for number, entry in enumerate((e.strip() for e in text.split(",")), start=1):
        if not entry:
            continue
        name, sep, digest = (part.strip() for part in entry.partition(":"))
        where = f"{SETTING}: entry {number}"
        if not sep or not NAME.fullmatch(name):
            raise ValueError(
                f"{where} must be name:sha256-hex, the name 1-64 letters, digits, '.', '_' or '-'"
            )
        if not SHA256_HEX.fullmatch(digest):
            raise ValueError(
                f"{where} ({name}) must have the key's SHA-256 as 64 hex digits "
                "after the colon (a hash, never the key itself)"
            )
        if name in hashes:
            raise ValueError(f"{where}: the name {name} is listed twice")
        digest = digest.lower()
        if digest in seen:
            raise ValueError(f"{where} ({name}): the same key is listed under another name")
        seen.add(digest)
        hashes[name] = digest
    return hashes


def hash_key(key: str) -> str:
    """The hex SHA-256 of a client key, as STREAMGATE_CLIENT_KEY_HASHES lists it."""
    return hashlib.sha256(key.encode()).hexdigest()


class Unauthorized(Exception):
    def __init__(self, message: str, challenge: bytes) -> None:
        super().__init__(message)
        self.message, self.challenge = message, challenge


class ClientKeys:
    """The configured keys of one worker, made once at start-up; falsy when none are set."""

    __slots__ = ("_digests",)

    def __init__(self, hashes: Mapping[str, str]) -> None:
        self._digests = tuple((name, bytes.fromhex(digest)) for name, digest in hashes.items())

    def __bool__(self) -> bool:
        return bool(self._digests)

    @property
    def names(self) -> list[str]:
        return [name for name, _ in self._digests]

    def identify(self, headers: Iterable[tuple[bytes, bytes]]) -> str:
        """The name of the key in the request's `Authorization: Bearer` header, or
        Unauthorized."""
        value = None
        for header, field in headers:
            if header == b"authorization":
                value = field
                break
        if value is None:
            raise Unauthorized(
                "missing API key: send it as 'Authorization: Bearer <key>'", CHALLENGE_MISSING
            )
        scheme, _, key = value.strip().partition(b" ")
        key = key.strip()
        if scheme.lower() != b"bearer" or not key:
            raise Unauthorized("the Authorization header must be 'Bearer <key>'", CHALLENGE_INVALID)
        presented = hashlib.sha256(key).digest()
        found = None
        for name, digest in self._digests:  # every one, no early exit: see the module docstring
            if hmac.compare_digest(presented, digest):
                found = name
        if found is None:
            raise Unauthorized("incorrect API key provided", CHALLENGE_INVALID)
        return found
