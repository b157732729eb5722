"""Client keys in-process: the setting's format, the Bearer check, and a 401 before the body."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import httpx
import orjson
import pytest
from pydantic import ValidationError
from streamgate import auth
from streamgate.auth import ClientKeys, Unauthorized, hash_key, parse_key_hashes
from streamgate.settings import Settings, check_env_file
from support.services import clean_environ

pytestmark = pytest.mark.anyio

KEY_A, KEY_B = "sk-sg-" + "a" * 40, "sk-sg-" + "b" * 40
HASHES = {"web": hash_key(KEY_A), "batch": hash_key(KEY_B)}
SETTING = f"web:{HASHES['web']}, batch:{HASHES['batch'].upper()}"


def test_the_setting_lists_named_hashes():
    assert parse_key_hashes(SETTING) == HASHES  # spaces and upper-case hex are fine
    assert parse_key_hashes("") == {} and parse_key_hashes(" , ") == {}
    settings = Settings(client_key_hashes=SETTING, _env_file=None)  # type: ignore[call-arg]
    assert settings.client_key_hashes == HASHES


@pytest.mark.parametrize(
    ("value", "words"),
    [
        (f"web {HASHES['web']}", "entry 1 must be name:sha256-hex"),
        (f":{HASHES['web']}", "entry 1 must be name:sha256-hex"),
        (f"we b:{HASHES['web']}", "entry 1 must be name:sha256-hex"),
        (f"web:{HASHES['web']},batch:{KEY_B}", "entry 2 (batch) must have the key's SHA-256"),
        (f"web:{HASHES['web'][:-1]}", "64 hex digits"),
        (f"web:{HASHES['web']},web:{HASHES['batch']}", "the name web is listed twice"),
        (f"web:{HASHES['web']},other:{HASHES['web']}", "same key is listed under another name"),
    ],
)
def test_a_bad_entry_refuses_to_start_naming_the_setting_and_never_echoing_it(value, words):
    with pytest.raises(ValidationError) as raised:
        Settings(client_key_hashes=value, _env_file=None)  # type: ignore[call-arg]
    message = str(raised.value)
    assert "STREAMGATE_CLIENT_KEY_HASHES" in message and words in message
    assert KEY_B not in message and HASHES["web"][:-1] not in message  # no input in the error


def test_names_but_no_hashes_are_in_what_may_be_logged():
    settings = Settings(client_key_hashes=SETTING, _env_file=None)  # type: ignore[call-arg]
    shown = orjson.dumps(settings.public_dict()).decode()
    assert settings.public_dict()["client_key_names"] == ["web", "batch"]
    assert HASHES["web"] not in shown and HASHES["batch"] not in shown
    assert HASHES["web"] not in repr(settings)


@pytest.mark.parametrize(
    ("headers", "name"),
    [
        ([(b"authorization", f"Bearer {KEY_A}".encode())], "web"),
        ([(b"authorization", f"Bearer {KEY_B}".encode())], "batch"),
        ([(b"authorization", f"bearer   {KEY_B} ".encode())], "batch"),
        ([(b"x-other", b"1"), (b"authorization", f"Bearer {KEY_A}".encode())], "web"),
    ],
)
def test_a_configured_key_is_known_by_its_name(headers, name):
    assert ClientKeys(HASHES).identify(headers) == name


@pytest.mark.parametrize(
    ("headers", "challenge"),
    [
        ([], auth.CHALLENGE_MISSING),
        ([(b"authorization", b"Bearer " + KEY_A.encode() + b"x")], auth.CHALLENGE_INVALID),
        ([(b"authorization", b"Bearer " + HASHES["web"].encode())], auth.CHALLENGE_INVALID),
        ([(b"authorization", b"Basic " + KEY_A.encode())], auth.CHALLENGE_INVALID),
        ([(b"authorization", KEY_A.encode())], auth.CHALLENGE_INVALID),
        ([(b"authorization", b"Bearer ")], auth.CHALLENGE_INVALID),
        ([(b"x-api-key", KEY_A.encode())], auth.CHALLENGE_MISSING),
    ],
)
def test_anything_else_is_refused(headers, challenge):
    with pytest.raises(Unauthorized) as raised:
        ClientKeys(HASHES).identify(headers)
    assert raised.value.challenge == challenge


def test_every_hash_is_compared_whichever_matches(monkeypatch):
    """No early exit: the time taken does not tell which name a key matched."""
    compared = []
    real = auth.hmac.compare_digest
    monkeypatch.setattr(auth.hmac, "compare_digest", lambda a, b: compared.append(b) or real(a, b))
    keys = ClientKeys(HASHES)
    for key in (KEY_A, KEY_B, "wrong"):
        compared.clear()
        try:
            keys.identify([(b"authorization", f"Bearer {key}".encode())])
        except Unauthorized:
            pass
        assert len(compared) == len(HASHES), key


def test_no_keys_configured_means_none_asked_for():
    assert not ClientKeys({})
    assert ClientKeys(HASHES)


async def test_401_is_openai_shaped_and_sent_before_the_body_is_read(make_app, fake_upstream):
    app = make_app(client_key_hashes=HASHES)
    sent, received = [], []

    async def receive():
        received.append(1)
        await asyncio.sleep(3600)  # a body that never comes: the 401 must not wait for it

    async def send(message):
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": "/v1/chat/completions",
        "raw_path": b"",
        "root_path": "",
        "query_string": b"",
        "client": ("t", 1),
        "server": ("t", 80),
        "state": {},
        "headers": [(b"authorization", b"Bearer sk-wrong")],
    }
    await asyncio.wait_for(app(scope, receive, send), timeout=2)
    assert received == [] and fake_upstream.requests == []
    start, body = sent
    assert start["status"] == 401
    headers = dict(start["headers"])
    assert headers[b"www-authenticate"] == auth.CHALLENGE_INVALID
    assert headers[b"content-type"] == b"application/json"
    error = orjson.loads(body["body"])["error"]
    assert error["code"] == "invalid_api_key" and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("path", ["/v1/chat/stream", "/v1/chat/stream-sse", "/v1/chat/completions"])
async def test_every_chat_route_asks_for_a_key_and_health_does_not(make_app, path):
    app = make_app(client_key_hashes=HASHES)
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t") as client:
        refused = await client.post(path, json={"prompt": "hi"})
        accepted = await client.post(
            path, json={"prompt": "hi"}, headers={"Authorization": f"Bearer {KEY_B}"}
        )
        health = await client.get("/healthz")
    assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer")
    assert accepted.status_code == 200  # control: the same request with a key goes through
    assert health.status_code == 200


async def test_without_keys_configured_the_routes_stay_open(make_app):
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(make_app()), base_url="http://t"
    ) as client:
        response = await client.post("/v1/chat/stream", json={"prompt": "hi"})
    assert response.status_code == 200


def test_an_env_file_can_be_checked_before_it_is_put_in_place(tmp_path):
    """A bad entry reaching a reload stops gunicorn's master: Ansible validates the file first."""
    good, bad = tmp_path / "good.env", tmp_path / "bad.env"
    good.write_text(f"STREAMGATE_CLIENT_KEY_HASHES={SETTING}\n")
    bad.write_text(f"STREAMGATE_CLIENT_KEY_HASHES=web:{KEY_A}\n")
    assert check_env_file([str(good)]) == 0
    run = subprocess.run(
        [sys.executable, "-m", "streamgate.settings", str(bad)],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        env=clean_environ(),
    )
    assert run.returncode == 1
    assert "STREAMGATE_CLIENT_KEY_HASHES: entry 1 (web)" in run.stderr
    assert KEY_A not in run.stderr
