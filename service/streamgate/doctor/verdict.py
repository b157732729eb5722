"""Judging one probe (probe.py's JSON) by timing alone: streamed, coalesced, buffered,
headers-held or failed, how sure, why, and which known cause the evidence points to.

Never by the text: against a real model nobody knows the words. What a hop cannot fake is time:
a model does not write its whole answer in one instant, so an answer that arrives in one burst
at the end was held somewhere; reads that each carry many tokens at a steady rhythm were
collected by a buffer or a timer; a response head that arrives only with the first data was held
with it. Standard library only, like the probe.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

STREAMED, COALESCED, BUFFERED, HEADERS_HELD, FAILED = (
    "streamed",
    "coalesced",
    "buffered",
    "headers-held",
    "failed",
)
# Worst last: the order in which verdicts degrade (hop mode reports the first hop that degrades).
VERDICTS = (STREAMED, HEADERS_HELD, COALESCED, BUFFERED, FAILED)

# The rules shared with the load test's judge (loadtest/streamcheck.py StreamTiming): at least
# this share of the tokens must arrive in reads of their own...
MIN_SEPARATE_READS_RATIO = 0.8
# ...and reads at their typical (median) gap must cover at least this share of the arrival span
# (else most came in bursts after holds).
MIN_SPAN_RATIO = 0.5
# Fewer tokens than this prove nothing either way: the verdict is then of low confidence.
MIN_TOKENS = 10
# Buffered: at least this share of the tokens arrived in a final burst faster than a model
# writes to one client (few exceed 500 tokens a second). Judged by rate, not by the first token's
# share of the time: a reasoning model thinks for seconds, then streams at its usual pace.
FINAL_BURST_TOKEN_SHARE = 0.9
MAX_MODEL_TOKENS_PER_S = 500.0
# Headers-held: the head came with the first data (within HEAD_WITH_DATA_MS) after waiting at
# least HEADERS_HELD_MIN_MS. Below that a held head cannot be told from a fast first token, and
# does no harm.
HEAD_WITH_DATA_MS = 2.0
HEADERS_HELD_MIN_MS = 1000.0
# Coalesced rhythms: reads of about one size (a buffer of 4-64 KiB), or at about one interval.
BUFFER_MIN_BYTES = 3500
BUFFER_SIZE_SPREAD = 0.3  # (max - min) / median of the read sizes before the last
TIMER_MIN_MS = 30.0
TIMER_GAP_SPREAD = 0.5  # (p90 - p10) / p50 of the gaps between token reads

CDN_MARKERS = (
    "cf-ray",
    "x-amz-cf-id",
    "x-amz-cf-pop",
    "x-served-by",
    "x-cache",
    "x-fastly-request-id",
    "x-akamai-transformed",
    "akamai-grn",
    "x-azure-ref",
    "x-vercel-id",
    "fly-request-id",
    "via",
)
# The response headers a person needs to see to judge a stream (the table and the JSON).
HEADERS_THAT_MATTER = (
    "content-type",
    "content-encoding",
    "transfer-encoding",
    "content-length",
    "x-accel-buffering",
    "cache-control",
    "via",
    "server",
    *CDN_MARKERS[:-1],
)


@dataclass(frozen=True)
class Cause:
    id: str
    verdicts: tuple[str, ...]  # the verdicts it explains
    evidence: str  # what in the probe points to it
    reason: str  # one sentence for a person ({...} filled from the facts)
    fix: str  # one or two sentences; {find_the_layer}: FIND_THE_LAYER of the run's mode


# Where to look for the layer a cause names, by the run's mode: a run on one URL points to hop
# mode; hop mode has probed every hop already, and the report names the first that degrades.
FIND_THE_LAYER = {
    False: "Probe each hop (--inventory) to find the layer.",
    True: "If the hop before this one did better, the layer is this hop's own server or sits "
    "between the two (a relay, a proxy, a redirect).",
}


# The table of known causes, one row per cause; the first row whose evidence holds is named.
CAUSES = (
    Cause(
        "unreachable",
        (FAILED,),
        "no TCP connection: refused, unresolvable, or timed out",
        "The probe could not connect: {error}.",
        "Check the URL's host and port, and that the server is running and reachable from here.",
    ),
    Cause(
        "tls",
        (FAILED,),
        "the TLS handshake failed or the certificate is not trusted",
        "The probe could not set up TLS: {error}.",
        "Pass --cacert with the server's CA file (or --insecure to look anyway), or use the "
        "right host name.",
    ),
    Cause(
        "http-status",
        (FAILED,),
        "the answer's status is not 2xx",
        "The server answered {status} {status_reason}, not a stream: {body}.",
        "401/403: pass --key; 400/404/422: the URL or --body is not what the server takes "
        "(--model, --body); 5xx: the server or its upstream is failing.",
    ),
    Cause(
        "timeout",
        (FAILED,),
        "the answer did not finish within --timeout",
        "The answer did not finish in time: {error}.",
        "Raise --timeout, lower --max-tokens, or find the hop that holds the stream open.",
    ),
    Cause(
        "protocol",
        (FAILED,),
        "the bytes broke HTTP/1.1 (head, chunk sizes, lengths, content coding) or the "
        "connection broke",
        "The answer could not be read: {error}.",
        "Something between here and the app speaks broken HTTP. {find_the_layer}",
    ),
    Cause(
        "no-content",
        (FAILED,),
        "a 2xx answer that carried no tokens",
        "The answer carried no tokens ({body_bytes} body bytes, {stream_error}).",
        "Check --body and --model: the server must be asked for a streamed answer "
        '("stream": true on OpenAI routes).',
    ),
    Cause(
        "whole-body",
        (BUFFERED,),
        "a Content-Length instead of chunked transfer coding, and the whole answer at the end",
        "The answer came whole with a Content-Length of {content_length}: some layer built the "
        "whole body before sending it.",
        "Make every layer stream: a non-streaming handler, a response-reading middleware or a "
        "load balancer (AWS ALB in front of Lambda) builds whole bodies. {find_the_layer}",
    ),
    Cause(
        "nginx-proxy-buffering",
        (BUFFERED, HEADERS_HELD),
        "Server: nginx; with buffering on, the head waits for the first body buffer, and gzip "
        "(or another body filter) is never told to flush, so the whole answer comes at the end",
        "nginx held {what}: proxy_buffering is on (the app's X-Accel-Buffering: no is ignored "
        "or absent){with_gzip}.",
        "Set proxy_buffering off in nginx's streaming location (or honour X-Accel-Buffering: "
        "no), and keep text/event-stream and text/plain out of gzip_types.",
    ),
    Cause(
        "gzip",
        (BUFFERED, COALESCED),
        "Content-Encoding: gzip/deflate on the stream, its reads held until the compressor "
        "fills a block",
        "A compressing layer ({encoding}) held the stream: {what}.",
        "Turn compression off for text/event-stream and text/plain streams (nginx gzip_types, "
        "Traefik compress, Starlette GZipMiddleware, Cloudflare) or make it flush every write.",
    ),
    Cause(
        "cdn",
        (BUFFERED, COALESCED),
        "CDN or proxy markers (Via, CF-Ray, X-Cache, X-Amz-Cf-Id, ...) on a held stream",
        "A CDN or proxy in front ({markers}) held the stream: {what}.",
        "Turn on streaming for this path at the CDN or proxy (Cloudflare: no buffering for "
        "text/event-stream; CloudFront: no caching, HTTP/1.1 to origin), or bypass it.",
    ),
    Cause(
        "nginx-buffering-body",
        (BUFFERED, COALESCED),
        "Server: nginx, no compression, the stream held",
        "nginx (or a layer behind it) held the stream: {what}.",
        "Set proxy_buffering off in nginx's streaming location and proxy_http_version 1.1. "
        "{find_the_layer}",
    ),
    Cause(
        "size-buffer",
        (COALESCED,),
        "reads of one size, {buffer_kib} KiB each: a write buffer flushed when full",
        "The tokens came in {token_reads} reads of about {buffer_kib} KiB: a layer collects the "
        "stream into a buffer and sends it when full.",
        "Find the layer with a {buffer_kib} KiB buffer (a gateway or proxy that flushes on size, "
        "a compression buffer) and make it flush every write.",
    ),
    Cause(
        "flush-interval",
        (COALESCED,),
        "reads at one steady interval of about {gap_p50_ms:.0f} ms, each with several tokens",
        "The tokens came in bursts every {gap_p50_ms:.0f} ms ({tokens_per_read:.1f} per read): "
        "a layer flushes on a timer.",
        "Find the layer with a flush interval (Caddy flush_interval -1, a proxy's or "
        "gateway's flush timer, word coalescing) and set it to flush at once.",
    ),
    Cause(
        "coalescing",
        (COALESCED,),
        "several tokens per read at no clear rhythm",
        "The tokens came {tokens_per_read:.1f} per read in {token_reads} reads: some layer "
        "merges writes.",
        "Make the layer that merges writes pass each one on. {find_the_layer}",
    ),
    Cause(
        "http2-headers",
        (HEADERS_HELD,),
        "an HTTP/2 hop (Via: 2, or h2 negotiated) and the head held until the first data",
        "The head came only with the first data after {headers_ms:.0f} ms: an HTTP/2 hop holds "
        "its HEADERS frame until the first DATA frame.",
        "Upgrade or reconfigure that HTTP/2 proxy to send headers at once (Go net/http, Apache "
        "mod_h2 had this), or have the app send a first byte early (an SSE comment).",
    ),
    Cause(
        "held-head",
        (HEADERS_HELD,),
        "the head held until the first data, no marker of which layer",
        "The status and headers came only with the first data after {headers_ms:.0f} ms: a "
        "layer holds the head, or the app starts its answer only at its first token.",
        "If the app starts at its first token on purpose (streamgate's gateway does, to keep "
        "real error statuses), this is its choice. {find_the_layer}",
    ),
    Cause(
        "whole-answer",
        (BUFFERED,),
        "the whole answer at the end, no marker of which layer",
        "The whole answer came at once after {ttft_ms:.0f} ms (in {reads_text}): some "
        "layer held it (a buffering proxy, a load balancer, a TLS-inspecting proxy).",
        "Make the layer that holds it pass each write on. {find_the_layer}",
    ),
)
CAUSES_BY_ID = {cause.id: cause for cause in CAUSES}


def percentile(values: list[float], share: float) -> float | None:
    """Nearest-rank percentile (share in 0..1); None for no values."""
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(share * len(ordered)) - 1))]


def separate_reads_short(token_reads: int, tokens: int) -> bool:
    """Too few reads for the tokens: under MIN_SEPARATE_READS_RATIO of them came alone."""
    return min(token_reads, tokens) < MIN_SEPARATE_READS_RATIO * tokens


def bursty(times_ms: list[float]) -> bool:
    """Reads at their typical gap would cover under MIN_SPAN_RATIO of the span they did cover:
    most came in bursts after holds (the load test's rule at an unknown pace)."""
    if len(times_ms) < 3:
        return False
    gaps = [later - earlier for earlier, later in itertools.pairwise(times_ms)]
    median = sorted(gaps)[len(gaps) // 2]
    return (len(times_ms) - 1) * median < MIN_SPAN_RATIO * (times_ms[-1] - times_ms[0])


def facts(probe: dict) -> dict:
    """The numbers a verdict rests on, from a probe result."""
    reads = probe.get("reads") or []
    token_reads = [(at, size, tokens) for at, size, tokens in reads if tokens]
    times = [at for at, _, _ in token_reads]
    gaps = [later - earlier for earlier, later in itertools.pairwise(times)]
    tokens = int(probe.get("tokens") or 0)
    ttft = times[0] if times else None
    total = probe.get("t_end_ms") or (reads[-1][0] if reads else None)
    headers = {name.lower(): value for name, value in (probe.get("headers") or {}).items()}
    head_ms, first_body_ms = probe.get("t_headers_ms"), probe.get("t_first_body_ms")
    sizes = [size for _, size, _ in token_reads[:-1]]
    return {
        "ttft_ms": ttft,
        "reads": len(reads),
        "token_reads": len(token_reads),
        "tokens": tokens,
        "tokens_per_read": tokens / len(token_reads) if token_reads else 0.0,
        "span_ms": times[-1] - times[0] if times else 0.0,
        "total_ms": total,
        "headers_ms": head_ms,
        "head_wait_ms": (
            first_body_ms - head_ms if head_ms is not None and first_body_ms is not None else None
        ),
        "gap_p50_ms": percentile(gaps, 0.5),
        "gap_p90_ms": percentile(gaps, 0.9),
        "gap_p99_ms": percentile(gaps, 0.99),
        "gap_max_ms": max(gaps) if gaps else None,
        # The rhythm of a buffer or timer: the gaps before the last (the end flushes early).
        "rhythm_gaps_ms": gaps[:-1] if len(gaps) > 2 else gaps,
        "read_bytes_p50": percentile([float(size) for size in sizes], 0.5),
        "read_bytes_min": min(sizes) if sizes else None,
        "read_bytes_max": max(sizes) if sizes else None,
        "times": times,
        "token_counts": [count for _, _, count in token_reads],
        "headers": headers,
    }


def final_burst_share(fact: dict) -> float:
    """The share of the tokens that arrived in the final burst: within the time a model at
    MAX_MODEL_TOKENS_PER_S takes to write FINAL_BURST_TOKEN_SHARE of them, before the last."""
    times, counts, tokens = fact["times"], fact["token_counts"], fact["tokens"]
    if not times or not tokens:
        return 0.0
    window_ms = FINAL_BURST_TOKEN_SHARE * tokens / MAX_MODEL_TOKENS_PER_S * 1000
    in_burst = sum(
        count for at, count in zip(times, counts, strict=True) if at >= times[-1] - window_ms
    )
    return in_burst / tokens


def _timing_verdict(fact: dict) -> str:
    tokens = fact["tokens"]
    if tokens >= 2 and (
        fact["token_reads"] == 1 or final_burst_share(fact) >= FINAL_BURST_TOKEN_SHARE
    ):
        return BUFFERED
    if tokens >= 2 and (separate_reads_short(fact["token_reads"], tokens) or bursty(fact["times"])):
        return COALESCED
    head_wait, head_ms = fact["head_wait_ms"], fact["headers_ms"]
    if (
        head_wait is not None
        and head_wait <= HEAD_WITH_DATA_MS
        and head_ms is not None
        and head_ms >= HEADERS_HELD_MIN_MS
    ):
        return HEADERS_HELD
    return STREAMED


def _failure_cause(probe: dict, fact: dict) -> str | None:
    error = probe.get("error") or ""
    status = probe.get("status")
    if status is None:
        if error.startswith(
            ("connection to", "cannot resolve", "no TCP connection", "cannot connect")
        ):
            return "unreachable"
        if error.startswith("TLS"):
            return "tls"
        if error.startswith("no complete answer"):
            return "timeout"
        return "protocol"
    if not 200 <= status < 300:
        return "http-status"
    if fact["tokens"] == 0:
        if error.startswith("no complete answer"):
            return "timeout"
        return "protocol" if error else "no-content"
    return None


def _held_cause(verdict: str, fact: dict, probe: dict) -> str:
    headers = fact["headers"]
    server = headers.get("server", "").lower()
    encoding = headers.get("content-encoding", "").lower()
    chunked = "chunked" in headers.get("transfer-encoding", "").lower()
    behind_cdn = "cloudflare" in server or any(name in headers for name in CDN_MARKERS)
    if verdict == HEADERS_HELD:
        if server.startswith(("nginx", "openresty")):
            return "nginx-proxy-buffering"
        if probe.get("alpn") == "h2" or headers.get("via", "").startswith("2"):
            return "http2-headers"
        return "held-head"
    if verdict == BUFFERED and "content-length" in headers and not chunked:
        return "whole-body"
    if encoding not in ("", "identity"):
        if verdict == BUFFERED and server.startswith(("nginx", "openresty")):
            return "nginx-proxy-buffering"
        return "gzip"
    if behind_cdn:
        return "cdn"
    if server.startswith(("nginx", "openresty")):
        return "nginx-buffering-body"
    if verdict == COALESCED:
        median = fact["read_bytes_p50"]
        if (
            median is not None
            and median >= BUFFER_MIN_BYTES
            and (fact["read_bytes_max"] - fact["read_bytes_min"]) <= BUFFER_SIZE_SPREAD * median
        ):
            return "size-buffer"
        rhythm = fact["rhythm_gaps_ms"]
        p10, p50, p90 = (percentile(rhythm, share) for share in (0.1, 0.5, 0.9))
        if (
            p10 is not None
            and p50 is not None
            and p90 is not None
            and p50 >= TIMER_MIN_MS
            and (p90 - p10) <= TIMER_GAP_SPREAD * p50
        ):
            return "flush-interval"
        return "coalescing"
    return "whole-answer"


def _what(verdict: str, fact: dict) -> str:
    if verdict == HEADERS_HELD:
        return f"the response head until the first data ({_round(fact['headers_ms']):.0f} ms)"
    if verdict == BUFFERED:
        return (
            f"the whole answer until the end ({fact['tokens']} tokens in "
            f"{_reads(fact['token_reads'])} at {_round(fact['ttft_ms']):.0f} ms)"
        )
    return f"{fact['tokens']} tokens came in {_reads(fact['token_reads'])}"


def _reads(count: int) -> str:
    return f"{count} read" if count == 1 else f"{count} reads"


def _fill(text: str, values: dict) -> str:
    try:
        return text.format(**values)
    except (KeyError, ValueError, TypeError):
        return text


def judge(probe_result: dict, hop_mode: bool = False) -> dict:
    """The verdict on one probe: verdict, confidence, reason, fix, cause and the numbers.
    `hop_mode`: the probe is one hop of a run over every hop (--inventory)."""
    fact = facts(probe_result)
    cause_id = _failure_cause(probe_result, fact)
    verdict = FAILED if cause_id else _timing_verdict(fact)
    if verdict not in (FAILED, STREAMED):
        cause_id = _held_cause(verdict, fact, probe_result)
    headers = fact["headers"]
    values = {
        **{key: _round(value) for key, value in fact.items() if value is not None},
        "error": (probe_result.get("error") or "").rstrip("."),
        "status": probe_result.get("status"),
        "status_reason": probe_result.get("reason") or "",
        "body": (probe_result.get("body_sample") or "").strip()[:160] or "no body",
        "body_bytes": probe_result.get("body_bytes", 0),
        "stream_error": probe_result.get("stream_error") or "no error event",
        "content_length": headers.get("content-length"),
        "encoding": headers.get("content-encoding"),
        "markers": ", ".join(f"{name}: {headers[name]}" for name in CDN_MARKERS if name in headers)
        or f"Server: {headers.get('server')}",
        "buffer_kib": round((fact["read_bytes_p50"] or 0) / 1024, 1),
        "what": _what(verdict, fact),
        "find_the_layer": FIND_THE_LAYER[hop_mode],
        "reads_text": _reads(fact["token_reads"]),
        "with_gzip": (
            ", so its gzip was never told to flush"
            if headers.get("content-encoding") and verdict == BUFFERED
            else ""
        ),
    }
    if cause_id is not None:
        cause = CAUSES_BY_ID[cause_id]
        reason, fix = _fill(cause.reason, values), _fill(cause.fix, values)
    else:
        reason = (
            f"The tokens arrived as they were written: {_reads(fact['token_reads'])} for "
            f"{fact['tokens']} tokens over {_round(fact['span_ms']):.0f} ms, the first at "
            f"{_round(fact['ttft_ms']):.0f} ms."
        )
        fix = "Nothing to fix."
    confidence = "high"
    if verdict != FAILED and fact["tokens"] < MIN_TOKENS:
        confidence = "low"
        reason += (
            f" Only {fact['tokens']} tokens arrived: too few to prove anything; ask for a longer "
            "answer (--max-tokens 200 with a prompt that makes the model write)."
        )
    stream_error = probe_result.get("stream_error")
    if stream_error and verdict != FAILED:
        reason += f" The stream also reported an error: {stream_error[:120]}."
    return {
        "verdict": verdict,
        "confidence": confidence,
        "reason": reason,
        "fix": fix,
        "cause": cause_id,
        **{key: _round(fact[key]) for key in SUMMARY_FIELDS},
        "headers": headers_that_matter(headers),
    }


def headers_that_matter(headers: dict[str, str]) -> dict[str, str]:
    """The response headers the report shows, by lower-case name."""
    lowered = {name.lower(): value for name, value in headers.items()}
    return {name: lowered[name] for name in HEADERS_THAT_MATTER if name in lowered}


SUMMARY_FIELDS = (
    "ttft_ms",
    "reads",
    "token_reads",
    "tokens",
    "tokens_per_read",
    "span_ms",
    "total_ms",
    "headers_ms",
    "head_wait_ms",
    "gap_p50_ms",
    "gap_p90_ms",
    "gap_p99_ms",
    "gap_max_ms",
)


def _round(value: object) -> object:
    return round(value, 1) if isinstance(value, float) else value


def exit_code(verdicts: list[str]) -> int:
    """0 when every verdict is streamed, 2 when a probe could not run, else 1."""
    if FAILED in verdicts:
        return 2
    return 0 if all(verdict == STREAMED for verdict in verdicts) else 1
