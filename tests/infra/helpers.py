"""Small helpers shared by the testinfra modules."""

from __future__ import annotations

import base64
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from support import chat, stream_probe
from support.stream_probe import Trace
from support.upstream import setting

# The load test's judges, so that a deployment is judged here as under load (one definition).
sys.path.append(str(Path(__file__).resolve().parents[2] / "loadtest"))
import streamcheck


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


# Run by python3 on a host (or here): one TCP connect, its outcome as one word.
CONNECT_PROBE = """
import socket, sys
try:
    socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=3).close()
    print("open")
except ConnectionRefusedError:
    print("refused")
except OSError as error:
    print("unreachable", error)
"""


def connect_from(host, address: str, port: int) -> str:
    """'open', 'refused' or 'unreachable ...': a TCP connect from `host` to address:port."""
    result = host.run(f"python3 -c {shlex.quote(CONNECT_PROBE)} {shlex.quote(address)} {port}")
    assert result.rc == 0, result.stderr
    return result.stdout.strip()


def connect_from_controller(address: str, port: int) -> str:
    """The same probe from the machine that runs the tests (the lab's controller)."""
    result = subprocess.run(
        [sys.executable, "-c", CONNECT_PROBE, address, str(port)],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    return result.stdout.strip()


# At most this exposure in `systemd-analyze security` for every unit the roles write.
MAX_EXPOSURE = 2.0


def security_exposure(host, unit: str) -> float:
    """The overall exposure level `systemd-analyze security` gives a unit (0 safe, 10 not)."""
    report = check_output_as_root(host, f"systemd-analyze security --no-pager {unit}")
    match = re.search(rf"Overall exposure level for {re.escape(unit)}:\s*([0-9.]+)", report)
    assert match, report[-500:]
    return float(match[1])


# The stream probe as one program for a host that has only python3 (support/stream_probe.py).
PROBE_SOURCE = stream_probe.standalone_program()


def probe_from(
    host, url: str, body: dict, headers: tuple[str, ...] = (), options: tuple[str, ...] = ()
) -> Trace:
    """Run the stream probe on `host` against `url` (POST `body`); the trace it saw, rebuilt
    here. `headers`: "Name: value" lines; `options`: more probe options (--cafile FILE)."""
    command = [
        "python3",
        "-c",
        PROBE_SOURCE,
        "--url",
        url,
        "--body",
        json.dumps(body),
        "--timeout",
        "30",
        *(part for header in headers for part in ("--header", header)),
        *options,
    ]
    result = host.run(" ".join(shlex.quote(part) for part in command))
    assert result.rc == 0, (
        f"probe exited {result.rc}: {result.stderr[-1000:]} {result.stdout[-1000:]}"
    )
    seen = json.loads(result.stdout)
    trace = Trace(
        status=seen["status"],
        headers=seen["headers"],
        chunked=seen["chunked"],
        complete=seen["complete"],
        body=base64.b64decode(seen["body_b64"]),
        error=seen["error"],
    )
    # The probe reports sizes and times per read; each read's payload is its slice of the body.
    trace.reads, offset = [], 0
    for read in seen["reads"]:
        data = trace.body[offset : offset + read["data_bytes"]]
        offset += read["data_bytes"]
        trace.reads.append(
            stream_probe.Read(at_s=read["at_s"], raw_bytes=read["raw_bytes"], data=data)
        )
    return trace


def private_address(hostvars: dict) -> str:
    """A host's address on the stack's shared network, as the roles derive it."""
    return (
        hostvars.get("streamgate_private_address")
        or hostvars.get("ansible_host")
        or hostvars["inventory_hostname"]
    )


def served_address(hostvars: dict, clients: str) -> str:
    """The only address a host's service (gateway, simulator, llama.cpp) may listen on, and
    where its clients reach it, as the roles derive it: loopback when every host of the
    `clients` group is this host, else its private address."""
    if hostvars["groups"][clients] == [hostvars["inventory_hostname"]]:
        return "127.0.0.1"
    return private_address(hostvars)


@dataclass(frozen=True)
class Service:
    """A server the kit runs on the hosts of `group` for the hosts of `clients`."""

    name: str
    group: str
    clients: str
    unit: str
    port_setting: str
    firewall: str  # streamgate-firewall@<firewall>, nftables table inet streamgate_<firewall>
    health_paths: tuple[str, ...]
    dynamic_user: bool


GATEWAY_SERVICE = Service(
    name="gateway",
    group="app",
    clients="edge",
    unit="streamgate",
    port_setting="streamgate_port",
    firewall="gateway",
    health_paths=("/healthz", "/readyz"),
    dynamic_user=False,  # the account `streamgate`, which owns its env file
)
SIMULATOR_SERVICE = Service(
    name="simulator",
    group="simulator",
    clients="app",
    unit="streamgate-sim",
    port_setting="streamgate_sim_port",
    firewall="simulator",
    health_paths=("/healthz",),
    dynamic_user=True,
)
LLM_SERVICE = Service(
    name="llm",
    group="llm",
    clients="app",
    unit="streamgate-llm",
    port_setting="streamgate_llm_port",
    firewall="llm",
    health_paths=("/health",),  # 200 only once the model is loaded (503 before)
    dynamic_user=True,
)
SERVICES = (GATEWAY_SERVICE, SIMULATOR_SERVICE, LLM_SERVICE)


def service_url(hostvars: dict, service: Service) -> str:
    """Where the service's clients reach it on the host of `hostvars`: http://ADDRESS:PORT."""
    port = setting(hostvars, service.port_setting)
    return f"http://{served_address(hostvars, service.clients)}:{port}"


def other_hosts(hostvars: dict, excluded_groups: tuple[str, ...]) -> list[str]:
    """Inventory hosts in none of `excluded_groups`."""
    groups = hostvars["groups"]
    excluded = {name for group in excluded_groups for name in groups.get(group, [])}
    return sorted({name for name in groups.get("all", []) if name not in excluded})


def assert_only_group_reaches(
    hostvars: dict, inventory_host, group: str, address: str, port: int
) -> None:
    """Every host of `group` connects to address:port; every other host of the inventory (but
    the one under test) and the controller are refused."""
    for member in hostvars["groups"][group]:
        assert connect_from(inventory_host(member), address, port) == "open", member
    outsiders = [
        name for name in other_hosts(hostvars, (group,)) if name != hostvars["inventory_hostname"]
    ]
    for outsider in outsiders:
        assert connect_from(inventory_host(outsider), address, port) == "refused", outsider
    assert connect_from_controller(address, port) == "refused"


DECODERS = {
    chat.TEXT: streamcheck.TextDecoder,
    chat.SSE: streamcheck.SSEDecoder,
    chat.OPENAI: streamcheck.OpenAIDecoder,
}
# A real model's pace is not known in advance: judged against the stream's own (streamcheck).
UNKNOWN_PACE = streamcheck.StreamTiming(gap_ms=None)


def any_upstream_verdict(route: str, trace: Trace) -> str | None:
    """What is wrong with a streamed answer from an upstream whose words nobody knows, judged
    as the load test judges it: complete (the route's end, no in-band error), its protocol
    whole, arrived token by token at the stream's own pace. None: nothing."""
    decoder = DECODERS[route]()
    record = streamcheck.StreamRecord(started=0.0)
    for read in trace.reads:
        record.add_read(read.at_s, *decoder.feed(read.data))
    record.ended = trace.reads[-1].at_s if trace.reads else 0.0
    if not trace.complete:
        return f"{streamcheck.ABORTED}: {trace.error}"
    if decoder.error:
        return f"{streamcheck.ERROR_EVENT}: {decoder.error}"
    if decoder.has_end_event and not decoder.done:
        return streamcheck.NO_END
    tokens = streamcheck.count_tokens(record, decoder, None)
    return streamcheck.judge_protocol(record, decoder) or streamcheck.judge_buffered(
        record, tokens, UNKNOWN_PACE
    )


def any_upstream_whole_answer_verdict(trace: Trace) -> str | None:
    """The same timing judge on a non-streamed OpenAI answer (one JSON body): its tokens are the
    usage's, its content one read. A negative control: it must be judged buffered."""
    answer = json.loads(trace.body)
    content = answer["choices"][0]["message"]["content"]
    assert content, answer
    record = streamcheck.StreamRecord(started=0.0)
    record.add_read(trace.reads[-1].at_s, content, 1)
    record.ended = trace.reads[-1].at_s
    return streamcheck.judge_buffered(record, answer["usage"]["completion_tokens"], UNKNOWN_PACE)
