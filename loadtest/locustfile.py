"""Locust users that judge every streamed response: did it arrive token by token, fast, complete?

Locust alone times only the headers of a streamed response, so the users read the body
themselves, one socket read at a time, and fire their own request events:
  POST <path>        whole response: time = duration (ms), length = tokens; failure = error by kind
  ttft_ms <path>     time to the first content read
  itl_ms <path>      every gap between two content reads (and the last silence of a broken stream)
  tokens_per_s <path>  tokens / duration, in the "response time" column
  generator lagged <path>  one sample per complete response; a failure when it would be judged
                     buffered but this generator process itself stalled meanwhile (not judged)
  buffered <path>    one sample per judged response; a failure when it arrived buffered
  corrupt <path>     one sample per complete response; a failure when the text is not the
                     simulator's (from another upstream: no content, or its protocol not whole)
  generator_loop_lag_ms  the generator's own worst event-loop lag per half second
The SLO gates (slo.py) read these from Locust's stats, so they work on a distributed master too.
"""

from __future__ import annotations

import json
import time
import zlib

import gevent
import gevent.ssl
import loadopts
import slo
from locust import FastHttpUser, constant, events, task
from locust.runners import MasterRunner, WorkerRunner
from streamcheck import (
    ABORTED,
    BUFFERED,
    CORRUPT,
    ERROR_EVENT,
    GENERATOR_LAGGED,
    HTTP_STATUS,
    MALFORMED,
    NO_END,
    LagLog,
    OpenAIDecoder,
    SSEDecoder,
    StreamRecord,
    TextDecoder,
    count_tokens,
    excused_by_lag,
    judge_buffered,
    judge_corrupt,
    judge_protocol,
)


@events.init_command_line_parser.add_listener
def _add_options(parser) -> None:
    loadopts.add_options(parser)


# This process's record of its own stalls (see LagLog); replaced at init with the run's threshold.
LAG_LOG = LagLog(threshold_s=0.010)
LAG_PROBE_S = 0.005
LAG_REPORT_EVERY_S = 0.5


@events.init.add_listener
def _configure_users(environment, **_kwargs) -> None:
    global LAG_LOG
    options = environment.parsed_options
    if options is None:
        return
    # FastHttpUser reads these when a user starts: the read timeout bounds a silent stream.
    StreamUser.network_timeout = options.read_timeout_s
    StreamUser.wait_time = constant(options.think_time_s)
    # HTTPS is always verified (Locust's default is not): against the CA file when given.
    StreamUser.insecure = False
    StreamUser.ssl_context_factory = staticmethod(_tls_context_factory(options.ca_file or None))
    if options.api_key:
        StreamUser.request_headers = {
            **REQUEST_HEADERS,
            "Authorization": f"Bearer {options.api_key}",
        }
    if environment.runner is not None and not isinstance(environment.runner, MasterRunner):
        # Two tokens share a read once the loop is away for a gap; the probe wakes up to
        # LAG_PROBE_S early within that, so a lag of gap - probe is already too much.
        gap_s = (loadopts.timing_from(options).gap_ms or 0) / 1000
        LAG_LOG = LagLog(threshold_s=max(gap_s - LAG_PROBE_S, LAG_PROBE_S))
        _expected_tokens(options)  # import and build now, not inside the first stream
        gevent.spawn(_watch_own_lag, environment)


def _watch_own_lag(environment) -> None:
    """Sentinel: sleep briefly, note how late we woke; fire the worst lag every half second."""
    fire = environment.events.request.fire
    worst_s, window_start = 0.0, time.perf_counter()
    while True:  # ends with the process (greenlets die with the runner)
        due = time.perf_counter() + LAG_PROBE_S
        gevent.sleep(LAG_PROBE_S)
        woke = time.perf_counter()
        worst_s = max(worst_s, LAG_LOG.note(due, woke))
        if woke - window_start >= LAG_REPORT_EVERY_S:
            fire(
                request_type=slo.LOOP_LAG,
                name="generator event loop",
                response_time=worst_s * 1000,
                response_length=0,
                exception=None,
                context={},
            )
            worst_s, window_start = 0.0, woke


@events.quitting.add_listener
def _apply_gates(environment, **_kwargs) -> None:
    if isinstance(environment.runner, WorkerRunner) or environment.parsed_options is None:
        return
    options = environment.parsed_options
    gates = slo.evaluate(environment.stats, options)
    responses = slo.merged(environment.stats, slo.RESPONSE).num_requests
    print(f"streamgate load: {responses} responses judged")
    for gate in gates:
        print(gate.summary())
    user_exceptions = len(environment.runner.exceptions)
    if user_exceptions:
        print(f"FAIL: {user_exceptions} exceptions in the user code (see the log)")
    if options.gates_json:
        slo.write_json(options.gates_json, gates, responses)
    failed = user_exceptions or not all(gate.passed for gate in gates)
    environment.process_exit_code = 1 if failed else 0


def _read_available(raw) -> bytes | None:
    """The body bytes of one socket read as they arrive; None at the end of the message.

    geventhttpclient's own read(n) waits for n bytes, which would hide how the stream arrived,
    so this reads the socket once and feeds the response's parser (pinned geventhttpclient).
    """
    while not raw._body_buffer:
        if raw.message_complete:
            return None
        sock = raw._sock
        if sock is None:
            raise ConnectionError("connection released before the end of the body")
        data = sock.recv(raw.block_size)
        if not data:
            raise ConnectionError("connection closed before the end of the body")
        raw.feed(data)
    body = bytes(raw._body_buffer)
    del raw._body_buffer[:]
    return body


def _inflater(content_encoding: str | None):
    """A gzip decompressor for a gzip body, None for an identity one (the only two we accept)."""
    if content_encoding and content_encoding.strip().lower() == "gzip":
        return zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
    return None


def _discard_connection(raw) -> None:
    """Close a connection whose body was not read to the end (never reuse it)."""
    sock, pool = raw._sock, raw._pool
    raw._sock = raw._pool = None
    if sock is not None:
        if pool is not None:
            pool.release_socket(sock)
        else:
            sock.close()


# What a browser sends: gzip allowed, so a hop that compresses (and so buffers) is caught.
REQUEST_HEADERS = {
    "Content-Type": "application/json",
    "Accept": "text/event-stream, text/plain, application/json",
    "Accept-Encoding": "gzip",
}


def _tls_context_factory(ca_file: str | None):
    """A factory of verifying TLS contexts (trusting `ca_file` only, when given)."""

    def make_context(*_args, **_kwargs):
        return gevent.ssl.create_default_context(cafile=ca_file)

    return make_context


class StreamUser(FastHttpUser):
    """Measures and judges one streamed response per task; subclasses know one route each."""

    abstract = True
    path = ""
    # REQUEST_HEADERS, plus the client key when the run has one (set at init).
    request_headers = REQUEST_HEADERS
    decoder_class: type[TextDecoder] = TextDecoder
    wait_time = constant(0)

    def request_body(self, options) -> dict:
        return {"prompt": options.prompt, "model": options.model, "max_tokens": options.sim_tokens}

    @task
    def stream(self) -> None:
        options = self.environment.parsed_options
        decoder = self.decoder_class()
        record = StreamRecord(started=time.perf_counter())
        with self.client.post(
            self.path,
            data=json.dumps(self.request_body(options)),
            headers=self.request_headers,
            stream=True,
            catch_response=True,
            name=self.path,
        ) as response:
            if response.status_code != 200 or getattr(response, "error", None):
                record.error = self._error_before_body(response)
                if getattr(response, "_response", None) is not None:
                    _discard_connection(response._response)  # its body was never read
            else:
                self._read_body(response._response, record, decoder)
            record.ended = time.perf_counter()
            self._report(response, record, decoder, options)

    @staticmethod
    def _error_before_body(response) -> str:
        if response.status_code:
            return f"{HTTP_STATUS} {response.status_code}"
        return f"{ABORTED}: {type(response.error).__name__}"

    @staticmethod
    def _read_body(raw, record: StreamRecord, decoder: TextDecoder) -> None:
        inflate = _inflater(raw.get("content-encoding"))
        try:
            while (data := _read_available(raw)) is not None:
                content, units = decoder.feed(inflate.decompress(data) if inflate else data)
                record.add_read(time.perf_counter(), content, units)
        except TimeoutError:  # gevent raises socket.timeout, an alias
            record.error = f"{ABORTED}: read timeout"
        except (OSError, zlib.error) as error:  # ConnectionError, resets, a broken gzip stream
            record.error = f"{ABORTED}: {type(error).__name__}"
        except ValueError as error:  # an event whose JSON does not parse
            record.error = f"{MALFORMED}: {type(error).__name__}"
        if record.error:
            _discard_connection(raw)
        elif decoder.error:
            record.error = ERROR_EVENT
        elif decoder.has_end_event and not decoder.done:
            record.error = NO_END

    def _report(self, response, record: StreamRecord, decoder: TextDecoder, options) -> None:
        expected = _expected_tokens(options)
        tokens = count_tokens(record, decoder, expected)
        response.request_meta["response_time"] = record.duration_ms()
        response.request_meta["response_length"] = tokens
        if record.error:
            response.failure(record.error)
        else:
            response.success()
        fire = self.environment.events.request.fire
        if record.ttft_ms is not None:
            fire(
                request_type=slo.TTFT,
                name=self.path,
                response_time=record.ttft_ms,
                response_length=0,
                exception=None,
                context={},
            )
        for gap_ms in record.gaps_ms():
            fire(
                request_type=slo.ITL,
                name=self.path,
                response_time=gap_ms,
                response_length=0,
                exception=None,
                context={},
            )
        if record.error:
            return
        duration_s = record.duration_ms() / 1000
        if duration_s > 0:
            fire(
                request_type=slo.TOKENS_PER_S,
                name=self.path,
                response_time=tokens / duration_s,
                response_length=tokens,
                exception=None,
                context={},
            )
        timing = loadopts.timing_from(options)
        buffered = judge_buffered(record, tokens, timing)
        # Merged reads while this process itself stalled may be ours: not held against the target.
        lagged = buffered is not None and excused_by_lag(
            record, tokens, timing, *LAG_LOG.within(record.started, record.ended)
        )
        verdicts = [
            (GENERATOR_LAGGED, f"{GENERATOR_LAGGED}: not judged buffered" if lagged else None)
        ]
        if not lagged:
            verdicts.append((BUFFERED, buffered))
        verdicts.append(
            (
                CORRUPT,
                judge_corrupt(record, expected)
                if expected is not None
                else judge_protocol(record, decoder),
            )
        )
        for kind, failure in verdicts:
            fire(
                request_type=kind,
                name=self.path,
                response_time=0,
                response_length=tokens,
                exception=failure,
                context={},
            )


_expected_cache: dict[int, list[str]] = {}


def _expected_tokens(options) -> list[str] | None:
    """The simulator's deterministic tokens for this run; None from any other upstream."""
    if not loadopts.from_simulator(options):
        return None
    if options.sim_tokens not in _expected_cache:
        from streamgate.simulator.script import expected_tokens

        _expected_cache[options.sim_tokens] = expected_tokens(options.sim_tokens)
    return _expected_cache[options.sim_tokens]


class TextStreamUser(StreamUser):
    """The gateway's plain-text route."""

    path = "/v1/chat/stream"


class SSEStreamUser(StreamUser):
    """The gateway's server-sent-events route."""

    path = "/v1/chat/stream-sse"
    decoder_class = SSEDecoder


class OpenAIStreamUser(StreamUser):
    """The OpenAI-compatible route (the gateway's, or the simulator's directly)."""

    path = "/v1/chat/completions"
    decoder_class = OpenAIDecoder

    def request_body(self, options) -> dict:
        return {
            "model": options.model,
            "messages": [{"role": "user", "content": options.prompt}],
            "max_tokens": options.sim_tokens,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
