"""schemathesis against the running gateway: every operation in /openapi.json (the three chat
routes and the health routes), bodies generated from the schema, valid and invalid, sent with a
client key to real gunicorn and the simulator. No 5xx, every status, content type, header and
JSON body as the schema says, and the key the schema asks for really is asked for.

The policy is on (one model, small caps) and the simulator answers at once, so the streams are
short and the run stays well under a minute.
"""

from __future__ import annotations

import uuid

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    ignored_auth,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)
from streamgate.auth import hash_key

KEY = "sk-sg-schemathesis-" + uuid.uuid4().hex
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    ignored_auth,
]
MAX_EXAMPLES = 40


@pytest.fixture(scope="module")
def fuzzed_gateway(simulator_factory, gateway_factory):
    simulator = simulator_factory(ttft_ms=0, gap_ms=0, tokens=5)
    gateway = gateway_factory(
        simulator,
        workers=1,
        client_key_hashes=f"fuzz:{hash_key(KEY)}",
        allowed_models="streamgate-sim",
        default_model="streamgate-sim",
        max_tokens_limit=8,
        max_n=1,
        max_prompt_chars=2000,
    )
    yield gateway
    gateway.stop()
    simulator.stop()


@pytest.fixture(scope="module")
def gateway_schema(fuzzed_gateway):
    return schemathesis.openapi.from_url(f"{fuzzed_gateway.base_url}/openapi.json")


CHAT = ["/v1/chat/stream", "/v1/chat/stream-sse", "/v1/chat/completions"]
OPERATIONS = [("POST", path, mode) for path in CHAT for mode in GenerationMode] + [
    ("GET", path, GenerationMode.POSITIVE) for path in ("/healthz", "/readyz", "/metrics")
]


@pytest.mark.parametrize(
    ("method", "path", "mode"),
    OPERATIONS,
    ids=[f"{m} {p} {mode.value}" for m, p, mode in OPERATIONS],
)
def test_the_gateway_answers_as_its_schema_says(gateway_schema, fuzzed_gateway, method, path, mode):
    operation = gateway_schema[path][method]
    label = {
        "/v1/chat/stream": "stream",
        "/v1/chat/stream-sse": "stream-sse",
        "/v1/chat/completions": "completions",
    }.get(path)
    before = fuzzed_gateway.metrics()

    @given(case=operation.as_strategy(generation_mode=mode))
    @settings(
        max_examples=MAX_EXAMPLES,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    def call(case):
        case.call_and_validate(
            base_url=fuzzed_gateway.base_url,
            checks=CHECKS,
            headers={"Authorization": f"Bearer {KEY}"},
            timeout=10,
        )

    call()
    if label is not None and mode is GenerationMode.POSITIVE:
        # Not 400s only: valid bodies of the schema really streamed.
        answered = fuzzed_gateway.metrics()
        key = ("streamgate_requests_total", frozenset({"route": label, "status": "200"}.items()))
        assert answered.get(key, 0) - before.get(key, 0) >= MAX_EXAMPLES // 4


def test_the_schema_describes_the_chat_routes_and_their_key(gateway_schema):
    raw = gateway_schema.raw_schema
    for path in ("/v1/chat/stream", "/v1/chat/stream-sse", "/v1/chat/completions"):
        operation = raw["paths"][path]["post"]
        assert operation["security"] == [{"clientKey": []}]
        assert "401" in operation["responses"] and "200" in operation["responses"]
        assert operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert raw["components"]["securitySchemes"]["clientKey"]["scheme"] == "bearer"
    completion = raw["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    model = completion["model"]["anyOf"][0]
    assert model.get("enum", [model.get("const")]) == ["streamgate-sim"]
    assert completion["max_tokens"]["anyOf"][0]["maximum"] == 8
