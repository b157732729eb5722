"""Simulator settings: flags, STREAMGATE_SIM_* fallbacks, bounds."""

from __future__ import annotations

import pytest
from streamgate.simulator.config import SimConfig, parse_config
from streamgate.simulator.script import MAX_TOKENS


def test_defaults_match_the_contract():
    config = parse_config([], environ={})
    assert config == SimConfig(
        host="127.0.0.1",
        port=8100,
        ttft_ms=50,
        gap_ms=20,
        jitter_ms=0,
        tokens=50,
        stall_s=3600,
    )


def test_every_flag_is_read():
    argv = [
        "--host",
        "0.0.0.0",
        "--port",
        "9100",
        "--ttft-ms",
        "5",
        "--gap-ms",
        "1.5",
        "--jitter-ms",
        "2",
        "--tokens",
        "7",
        "--stall-s",
        "0.5",
    ]
    assert parse_config(argv, environ={}) == SimConfig("0.0.0.0", 9100, 5, 1.5, 2, 7, 0.5)


def test_environment_is_the_fallback_for_every_flag():
    environ = {
        "STREAMGATE_SIM_HOST": "::1",
        "STREAMGATE_SIM_PORT": "0",
        "STREAMGATE_SIM_TTFT_MS": "10",
        "STREAMGATE_SIM_GAP_MS": "3",
        "STREAMGATE_SIM_JITTER_MS": "1",
        "STREAMGATE_SIM_TOKENS": "12",
        "STREAMGATE_SIM_STALL_S": "2",
    }
    assert parse_config([], environ=environ) == SimConfig("::1", 0, 10, 3, 1, 12, 2)


def test_a_flag_beats_the_environment():
    config = parse_config(["--tokens", "9"], environ={"STREAMGATE_SIM_TOKENS": "12"})
    assert config.tokens == 9


@pytest.mark.parametrize(
    ("argv", "environ"),
    [
        (["--tokens", "0"], {}),
        (["--tokens", str(MAX_TOKENS + 1)], {}),
        (["--gap-ms", "-1"], {}),
        (["--port", "70000"], {}),
        (["--stall-s", "1e9"], {}),
        (["--ttft-ms", "soon"], {}),
        ([], {"STREAMGATE_SIM_TOKENS": "many"}),
        ([], {"STREAMGATE_SIM_JITTER_MS": "-5"}),
    ],
)
def test_bad_values_stop_with_a_usage_error(argv, environ, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_config(argv, environ=environ)
    assert exit_info.value.code == 2
    assert "streamgate-sim" in capsys.readouterr().err
