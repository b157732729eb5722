"""Small helpers shared by the testinfra modules."""

from __future__ import annotations

import re


def check_output_as_root(host, command: str) -> str:
    """Run `command` with sudo; fail with its stderr when it fails."""
    with host.sudo():
        result = host.run(command)
    assert result.rc == 0, f"{command!r} exited {result.rc}: {result.stderr}"
    return result.stdout


def parse_systemd_timespan(text: str) -> float:
    """Seconds in a systemd timespan such as "10min 45s" or "645000000" (microseconds)."""
    text = text.strip()
    if text.isdigit():
        return int(text) / 1_000_000
    units = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "min": 60.0, "h": 3600.0}
    parts = re.findall(r"([0-9.]+)\s*(us|ms|min|s|h)\b", text)
    assert parts, f"cannot parse timespan {text!r}"
    return sum(float(number) * units[unit] for number, unit in parts)
