"""Command-line options of the locustfile. Defaults live in locust.conf; each also reads an env var
(STREAMGATE_LOAD_<NAME>), and the command line wins over both."""

from __future__ import annotations

from streamcheck import StreamTiming
from support.upstream import SIMULATOR, UPSTREAM_KINDS

# (flag, type, default, help): the default here applies only when locust.conf is not used.
OPTIONS = [
    ("--model", str, "sim", "model name sent (sim-fault-<kind> makes the simulator misbehave)"),
    ("--prompt", str, "Tell me about streaming.", "prompt sent with every request"),
    ("--sim-tokens", int, 50, "tokens per response (sent as max_tokens)"),
    ("--sim-ttft-ms", float, 50.0, "the simulator's --ttft-ms: expected time to first token"),
    ("--sim-gap-ms", float, 20.0, "the simulator's --gap-ms: expected gap between tokens"),
    (
        "--upstream-kind",
        str,
        "simulator",
        "what the target streams from: 'simulator' (its exact text and pace are checked) or "
        "'openai-compatible' (any other server: protocol, completeness and timing, no text)",
    ),
    ("--min-separate-reads-ratio", float, 0.8, "buffered below this share of tokens in own reads"),
    ("--min-span-ratio", float, 0.5, "buffered below this share of the expected arrival span"),
    ("--read-timeout-s", float, 30.0, "silence on a stream before the client aborts it"),
    ("--think-time-s", float, 0.0, "pause of each user between two requests"),
    ("--slo-ttft-p95-ms", float, 1000.0, "gate: time to first token, 95th percentile"),
    ("--slo-itl-p99-ms", float, 200.0, "gate: gap between tokens, 99th percentile"),
    ("--slo-failure-ratio", float, 0.01, "gate: share of responses with an error"),
    ("--slo-buffered-ratio", float, 0.01, "gate: share of complete responses judged buffered"),
    ("--slo-corrupt-ratio", float, 0.0, "gate: share of complete responses judged corrupt"),
    (
        "--max-generator-lagged-ratio",
        float,
        0.05,
        "validity: share of responses during which the generator itself stalled",
    ),
    ("--gates-json", str, "", "also write the gate results to this JSON file"),
    # A secret: give it through the environment (STREAMGATE_LOAD_API_KEY), not the command line.
    ("--api-key", str, "", "client key sent as 'Authorization: Bearer <key>' (empty: none)"),
    (
        "--ca-file",
        str,
        "",
        "https: trust only this CA file (empty: the system store); always verified",
    ),
]


def add_options(parser) -> None:
    group = parser.add_argument_group("streamgate", "stream measuring, verdicts and SLO gates")
    for flag, kind, default, help_text in OPTIONS:
        env_var = "STREAMGATE_LOAD_" + flag.removeprefix("--").replace("-", "_").upper()
        group.add_argument(flag, type=kind, default=default, env_var=env_var, help=help_text)


def from_simulator(options) -> bool:
    if options.upstream_kind not in UPSTREAM_KINDS:
        raise ValueError(f"--upstream-kind must be one of {', '.join(UPSTREAM_KINDS)}")
    return options.upstream_kind == SIMULATOR


def timing_from(options) -> StreamTiming:
    return StreamTiming(
        ttft_ms=options.sim_ttft_ms,
        # Another server's pace is not known in advance (see StreamTiming).
        gap_ms=options.sim_gap_ms if from_simulator(options) else None,
        tokens=options.sim_tokens,
        min_separate_reads_ratio=options.min_separate_reads_ratio,
        min_span_ratio=options.min_span_ratio,
    )
