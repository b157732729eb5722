"""Client keys on the wire, with real gunicorn: named keys from the env file, 401 for anything
else (the openai SDK raises AuthenticationError), rotation by a HUP reload, and no key or hash
anywhere in the gateway's log.
"""

from __future__ import annotations

import os
import signal
import uuid

import httpx
import openai
import pytest
from streamgate.auth import hash_key
from streamgate.simulator.script import expected_text
from support.procs import wait_until
from support.services import client_keys_env_line

from wire.test_metrics_and_reload import workers_started

KEY_WEB = "sk-sg-web-" + uuid.uuid4().hex + uuid.uuid4().hex
KEY_BATCH = "sk-sg-batch-" + uuid.uuid4().hex + uuid.uuid4().hex
WRONG_KEY = "sk-sg-wrong-" + uuid.uuid4().hex + uuid.uuid4().hex
LOOKALIKE = "sk-sg-lookalike-" + uuid.uuid4().hex  # a key-shaped string in body and headers
TOKENS = 5
MESSAGES = [{"role": "user", "content": "hello"}]


@pytest.fixture(scope="module")
def env_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "streamgate.env"
    path.write_text(client_keys_env_line(web=KEY_WEB, batch=KEY_BATCH))
    return path


@pytest.fixture(scope="module")
def keyed_gateway(gateway_factory, simulator, env_file):
    gateway = gateway_factory(simulator, workers=2, env_file=env_file)
    wait_until(
        lambda: len(workers_started(gateway)) == 2, timeout_s=20, what="both workers to start"
    )
    yield gateway
    gateway.stop()


def post(gateway, key: str | None, route: str = "/v1/chat/stream", **extra) -> httpx.Response:
    headers = {"X-Request-ID": uuid.uuid4().hex, **extra.pop("headers", {})}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return httpx.post(
        f"{gateway.base_url}{route}",
        headers=headers,
        timeout=10,
        json={"prompt": "hello", "max_tokens": TOKENS, **extra},
    )


def sdk(gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key=key, max_retries=0, timeout=10)


@pytest.mark.parametrize(
    "key", [None, WRONG_KEY, hash_key(KEY_WEB)], ids=["none", "wrong", "the-hash"]
)
@pytest.mark.parametrize(
    "route", ["/v1/chat/stream", "/v1/chat/stream-sse", "/v1/chat/completions"]
)
def test_no_key_or_a_wrong_one_is_a_401_in_openai_shape(keyed_gateway, route, key):
    response = post(keyed_gateway, key, route)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")
    assert response.headers["content-type"] == "application/json"
    assert response.json()["error"]["code"] == "invalid_api_key"
    record = wait_until(
        lambda: keyed_gateway.access_record(response.headers["x-request-id"]),
        timeout_s=5,
        what="the access record",
    )
    assert record["status"] == 401 and record["outcome"] == "unauthorized"
    assert record["client"] is None


@pytest.mark.parametrize(("key", "name"), [(KEY_WEB, "web"), (KEY_BATCH, "batch")])
def test_each_named_key_streams_and_the_log_names_it(keyed_gateway, key, name):
    response = post(keyed_gateway, key)
    assert response.status_code == 200 and response.text == expected_text(TOKENS)
    record = wait_until(
        lambda: keyed_gateway.access_record(response.headers["x-request-id"]),
        timeout_s=5,
        what="the access record",
    )
    assert record["client"] == name and record["status"] == 200


def test_the_openai_sdk_raises_authentication_error_and_works_with_a_key(keyed_gateway):
    with (
        sdk(keyed_gateway, WRONG_KEY) as client,
        pytest.raises(openai.AuthenticationError) as raised,
    ):
        client.chat.completions.create(
            model="streamgate-sim", messages=MESSAGES, stream=True, max_tokens=TOKENS
        )
    assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"
    with sdk(keyed_gateway, KEY_BATCH) as client:  # control: the same call with a key
        stream = client.chat.completions.create(
            model="streamgate-sim", messages=MESSAGES, stream=True, max_tokens=TOKENS
        )
        text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == expected_text(TOKENS)


def test_health_metrics_and_docs_stay_open(keyed_gateway):
    for path in ("/healthz", "/readyz", "/metrics", "/openapi.json", "/docs"):
        assert httpx.get(f"{keyed_gateway.base_url}{path}", timeout=5).status_code == 200, path


def test_a_key_sent_anywhere_never_reaches_the_log(keyed_gateway):
    """Right, wrong and look-alike keys, in the Authorization header, other headers and the
    body: the whole log (workers' starts, access lines, errors) has none of them nor their
    hashes, and has the names."""
    sent = [
        post(keyed_gateway, KEY_WEB, user=LOOKALIKE, headers={"X-Api-Key": LOOKALIKE}),
        post(keyed_gateway, WRONG_KEY, headers={"X-Api-Key": KEY_BATCH}),
        post(keyed_gateway, LOOKALIKE, "/v1/chat/completions", granularity=LOOKALIKE),
        post(keyed_gateway, KEY_BATCH, "/v1/chat/completions", granularity=LOOKALIKE),
        post(keyed_gateway, KEY_BATCH, prompt=f"my key is {KEY_WEB}"),
    ]
    assert [response.status_code for response in sent] == [400, 401, 401, 400, 200]
    for response in sent:
        wait_until(
            lambda response=response: keyed_gateway.access_record(response.headers["x-request-id"]),
            timeout_s=5,
            what="the access records",
        )
    log = keyed_gateway.process.log_path.read_text(errors="replace")
    for secret in (KEY_WEB, KEY_BATCH, WRONG_KEY, LOOKALIKE):
        assert secret not in log
        assert hash_key(secret) not in log
    assert '"client":"web"' in log and '"client":"batch"' in log
    assert '"client_key_names":["web","batch"]' in log  # what the workers logged at start


def test_a_removed_key_is_refused_after_a_reload_and_the_others_keep_working(
    gateway_factory, simulator, tmp_path
):
    env_file = tmp_path / "streamgate.env"
    env_file.write_text(client_keys_env_line(web=KEY_WEB, batch=KEY_BATCH))
    gateway = gateway_factory(simulator, workers=2, env_file=env_file)
    try:
        wait_until(
            lambda: len(workers_started(gateway)) == 2, timeout_s=20, what="both workers to start"
        )
        # Rotation: "web" is moved to a new key; the old one is removed.
        new_web = "sk-sg-web2-" + uuid.uuid4().hex + uuid.uuid4().hex
        env_file.write_text(client_keys_env_line(web2=new_web, batch=KEY_BATCH))
        # Negative control: a changed file alone changes nothing; the reload applies it.
        assert post(gateway, KEY_WEB).status_code == 200
        assert post(gateway, new_web).status_code == 401
        os.kill(gateway.process.pid, signal.SIGHUP)
        wait_until(
            lambda: post(gateway, KEY_WEB).status_code == 401,
            timeout_s=20,
            interval_s=0.1,
            what="new workers without the removed key",
        )
        wait_until(
            lambda: len(workers_started(gateway)) == 4,
            timeout_s=20,
            what="both new workers to start",
        )
        # New workers start in milliseconds (the master has the code imported): an old one may
        # still take a connection for a moment, with the old keys, as a reload lets it.
        wait_until(
            lambda: len(gateway.worker_pids()) == 2, timeout_s=20, what="the old workers to exit"
        )
        for _ in range(6):
            assert post(gateway, KEY_WEB).status_code == 401
            assert post(gateway, new_web).status_code == 200
            assert post(gateway, KEY_BATCH).status_code == 200
    finally:
        gateway.stop()
