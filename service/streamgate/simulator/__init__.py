"""An OpenAI-compatible chat-completions simulator for tests, demos and benchmarks (no API key).

Run: ``streamgate-sim --host 127.0.0.1 --port 8100 --ttft-ms 50 --gap-ms 20 --jitter-ms 0
--tokens 50 --stall-s 3600``; every flag also reads ``STREAMGATE_SIM_<FLAG>`` (``--ttft-ms`` <-
``STREAMGATE_SIM_TTFT_MS``). ``--port 0`` picks a free port; the first stdout line is always
``streamgate-sim listening on http://HOST:PORT``.

Routes
------
``POST /v1/chat/completions``
    Body as OpenAI's: ``model`` (default ``streamgate-sim``), ``messages``, ``stream``,
    ``stream_options.include_usage``, ``max_tokens`` (or ``max_completion_tokens``). The answer
    has ``max_tokens`` tokens (clamped to ``script.MAX_TOKENS``), else ``--tokens``; its text is
    exactly ``"".join(script.expected_tokens(n))``. Headers: ``X-Request-ID`` is echoed (one is
    made up when absent); ``X-Sim-Fault`` selects a fault.
``GET /v1/models``
    ``{"object": "list", "data": [...]}``: ``streamgate-sim`` and every ``sim-fault-<kind>``.
``GET /healthz``
    ``{"status": "ok"}``.
``GET /stats``
    ``{"started", "completed", "cancelled", "active", "faults": {kind: count}, "peak_active",
    "connections_open", "connections_total", "tokens_sent", "requests_with_request_id",
    "recent_request_ids", "last_cancel_at", "recent_cancels": [{"request_id", "at",
    "tokens_sent"}], "active_streams": [{"request_id", "peer_port", "tokens_sent"}],
    "clock_lag_ms": {"p50", "p99", "max"}, "reset_at", "now"}``.

    - ``started == completed + cancelled + active`` always. ``started`` counts chat requests
      that passed validation (a 400 is not started); ``completed`` counts answers written as
      scripted, faults included; ``cancelled`` counts clients that went away first, recorded
      the moment the connection is lost (also while a stream is stalled and nothing is sent).
    - Times (``last_cancel_at``, ``recent_cancels[].at``, ``reset_at``, ``now``) are wall-clock
      ``time.time()`` seconds, comparable across processes on one host.
    - ``recent_request_ids`` / ``recent_cancels`` keep the last 256; only ``X-Request-ID``
      values received are recorded (made-up ones are not).
    - ``active_streams``: the answers being written now (at most 256), each with its request
      id (received or made up) and the client's port: a test maps a stream to the process
      that owns that port (which gateway worker holds it).
    - ``clock_lag_ms``: how late the token clock ran behind schedule (recent callbacks): when
      it is small, late tokens were late elsewhere (client, gateway, CPU contention).
``POST /stats/reset``
    Zero the counters (for tests that share one simulator); streams in flight stay counted
    as started and active. ``connections_open`` is a gauge and is kept.

Streaming wire format (``"stream": true``), HTTP/1.1 chunked, ``text/event-stream``
-------------------------------------------------------------------------------------
Headers are sent at once; after ``--ttft-ms`` one write carries the role chunk and the first
token, then one token per write every ``--gap-ms`` (+/- ``--jitter-ms``); the last token's write
also carries the stop chunk, the usage chunk and ``[DONE]``::

    data: {"id":"chatcmpl-sim…","object":"chat.completion.chunk","created":1700000000,
           "model":"streamgate-sim","system_fingerprint":"fp_streamgate_sim",
           "choices":[{"index":0,"delta":{"role":"assistant","content":"","refusal":null},
                       "logprobs":null,"finish_reason":null}]}
    data: {… "choices":[{"index":0,"delta":{"content":"Stream"},"logprobs":null,
           "finish_reason":null}]}
    …
    data: {… "choices":[{"index":0,"delta":{},"logprobs":null,"finish_reason":"stop"}]}
    data: {… "choices":[],"usage":{"prompt_tokens":P,"completion_tokens":N,"total_tokens":P+N}}
    data: [DONE]

(each event is one line followed by a blank line; with ``include_usage`` every chunk also has
``"usage":null`` and the usage chunk is sent, otherwise neither). Non-streaming answers are one
``chat.completion`` object after the time the stream would have taken.

Faults (model ``sim-fault-<kind>`` or header ``X-Sim-Fault: <kind>``; an unknown kind is a 400)
----------------------------------------------------------------------------------------------
``429``              HTTP 429 at once, OpenAI error body (``code: rate_limit_exceeded``).
``500``              HTTP 500 at once, OpenAI error body (``type: server_error``).
``error-midstream``  after n//2 tokens: ``data: {"error": {"message", "type": "server_error",
                     "param": null, "code": "simulated_midstream_error"}}``, then the response
                     ends cleanly (terminating chunk) without a stop chunk or ``[DONE]``.
                     Non-streaming: HTTP 500 with that body after the time of n//2 tokens.
``stall-first``      headers, then nothing for ``--stall-s``; then the normal stream.
``stall-midstream``  n//2 tokens, nothing for ``--stall-s``, then the rest.
``close-midstream``  n//2 tokens, then the connection is closed: no terminating chunk, no
                     ``[DONE]`` (clients see an incomplete chunked body). Non-streaming: closed
                     without an answer.
``drop-token``       token n//2 is never sent (its time slot passes empty); everything else is
                     normal, usage still says n: the text differs from the expected one.
Any other model name streams normally. Fault requests are counted under ``faults`` in /stats.

HTTP
----
HTTP/1.1 keep-alive (pipelined requests are answered in order, each only after the one before
has ended; at most 8 requests or 256 KiB are read ahead, then reading waits),
``Expect: 100-continue``; HTTP/1.0 clients get the stream without chunked framing, ended by
closing the connection. Bad requests (invalid JSON, wrong types, ``max_tokens`` < 1, an unknown
fault) get a 400 with an OpenAI error body, as do 404 (route), 405 (method), 413 (body over
1 MiB), 414 (request line) and 431 (headers over 16 KiB or 100 lines); the caps are the
constants at the top of http_server.py.

Modules
-------
``http_server``: connections, parsing, bounds, routes. ``simulation``: the shared state and one
answer played on the ``clock`` (token timer wheel), with its ``faults``, framed by
``openai_format``, counted in ``stats``. ``script``: the fixed answer text. ``config``: flags.
Test harnesses stay out of the wheel: tests/support/simulator_thread.py (in-process) and
tests/support/sim_capacity.py (a process on a free port; how many concurrent streams one
process carries).
"""

from streamgate.simulator.config import SimConfig, parse_config
from streamgate.simulator.script import MAX_TOKENS, expected_text, expected_tokens

__all__ = ["MAX_TOKENS", "SimConfig", "expected_text", "expected_tokens", "parse_config"]
