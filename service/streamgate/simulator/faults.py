"""The faults a request can ask for: by model name ``sim-fault-<kind>`` or the ``X-Sim-Fault``
header (the package docstring says what each one does). The answer plays them
(simulation.ChatResponse); this module names them and says which one a request asked for."""

from __future__ import annotations

from streamgate.simulator.openai_format import RequestError, error_body

FAULT_MODEL_PREFIX = "sim-fault-"
FAULT_HEADER = b"x-sim-fault"

FAULT_KINDS = (
    "429",
    "500",
    "error-midstream",
    "stall-first",
    "stall-midstream",
    "close-midstream",
    "drop-token",
)
# Refused at once, before any answer starts: their status is their kind.
IMMEDIATE_FAULTS = ("429", "500")
# The answer ends after half its tokens.
MIDSTREAM_END_FAULTS = ("error-midstream", "close-midstream")


def fault_of(model: str, headers: dict[bytes, bytes]) -> str | None:
    """The fault a request asks for (the header wins over the model name), or None."""
    header = headers.get(FAULT_HEADER)
    kind = None
    if header is not None:
        kind = header.decode("latin-1").strip()
    elif model.startswith(FAULT_MODEL_PREFIX):
        kind = model[len(FAULT_MODEL_PREFIX) :]
    if kind is not None and kind not in FAULT_KINDS:
        raise RequestError(
            400,
            f"unknown simulator fault {kind!r}; known: {', '.join(FAULT_KINDS)}",
            code="unknown_fault",
        )
    return kind


def immediate_error(kind: str) -> tuple[int, bytes]:
    """Status and body of a fault refused at once (429 or 500)."""
    if kind == "429":
        return 429, error_body("simulated rate limit", "requests", "rate_limit_exceeded")
    return 500, error_body("simulated server error", "server_error", None)


MIDSTREAM_ERROR = error_body(
    "simulated failure in the middle of the stream",
    "server_error",
    "simulated_midstream_error",
)
