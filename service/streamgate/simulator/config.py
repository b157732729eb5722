"""Simulator settings: command-line flags, each with a ``STREAMGATE_SIM_<FLAG>`` env fallback.

Precedence: flag, then environment (``--ttft-ms`` <- ``STREAMGATE_SIM_TTFT_MS``), then default.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from streamgate.simulator.script import MAX_TOKENS

ENV_PREFIX = "STREAMGATE_SIM_"
MAX_STALL_S = 86400.0
MAX_DELAY_MS = 600_000.0


@dataclass(frozen=True)
class SimConfig:
    """How the simulator answers; times in the unit their name says."""

    host: str = "127.0.0.1"
    port: int = 8100
    ttft_ms: float = 50.0
    gap_ms: float = 20.0
    jitter_ms: float = 0.0
    tokens: int = 50
    stall_s: float = 3600.0


# flag -> (type, lower bound, upper bound, help); bounds are inclusive, None = unchecked.
_FLAGS: dict[str, tuple[type, float | None, float | None, str]] = {
    "host": (str, None, None, "address to listen on"),
    "port": (int, 0, 65535, "TCP port (0 = any free port; the bound port is printed)"),
    "ttft-ms": (float, 0, MAX_DELAY_MS, "time from request to first token"),
    "gap-ms": (float, 0, MAX_DELAY_MS, "time between tokens"),
    "jitter-ms": (float, 0, MAX_DELAY_MS, "each delay varies by up to +/- this much"),
    "tokens": (int, 1, MAX_TOKENS, "tokens per response when the request has no max_tokens"),
    "stall-s": (float, 0, MAX_STALL_S, "how long the stall-first/stall-midstream faults pause"),
}


def _env_name(flag: str) -> str:
    return ENV_PREFIX + flag.upper().replace("-", "_")


def parse_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None
) -> SimConfig:
    """Build a SimConfig from flags and env; exits with a usage message on a bad value."""
    environ = os.environ if environ is None else environ
    defaults = SimConfig()
    parser = argparse.ArgumentParser(
        prog="streamgate-sim",
        description="OpenAI-compatible streaming simulator with fault injection.",
    )
    for flag, (kind, _, _, help_text) in _FLAGS.items():
        attribute = flag.replace("-", "_")
        default = environ.get(_env_name(flag), getattr(defaults, attribute))
        parser.add_argument(
            f"--{flag}",
            type=kind,
            default=default,
            help=f"{help_text} (env {_env_name(flag)}, default {getattr(defaults, attribute)})",
        )
    args = parser.parse_args(argv)
    values = {}
    for flag, (kind, low, high, _) in _FLAGS.items():
        attribute = flag.replace("-", "_")
        raw = getattr(args, attribute)
        try:
            value = kind(raw)  # env values arrive as strings
        except ValueError:
            parser.error(f"--{flag}: not a valid {kind.__name__}: {raw!r}")
        if low is not None and high is not None and not low <= value <= high:
            parser.error(f"--{flag}: {value} outside {low}..{high}")
        values[attribute] = value
    return SimConfig(**values)
