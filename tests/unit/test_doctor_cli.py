"""The doctor's report over hops in path order (what hop mode hands in), its table, JSON, HTML
timeline and exit status, from synthetic probe results."""

from __future__ import annotations

import io
import json
import re

import pytest
from streamgate.doctor import cli


def probe_result(reads: list[tuple[float, int, int]], **fields) -> dict:
    body = [at for at, _, tokens in reads if tokens]
    return {
        "url": "http://127.0.0.1:1/v1/chat/completions",
        "status": 200,
        "reason": "OK",
        "http_version": "HTTP/1.1",
        "alpn": None,
        "headers": {"transfer-encoding": "chunked", "server": "nginx"},
        "t_headers_ms": 0.5,
        "t_first_body_ms": body[0] if body else None,
        "t_end_ms": reads[-1][0] if reads else None,
        "reads": [list(read) for read in reads],
        "tokens": sum(tokens for _, _, tokens in reads),
        "error": None,
        "body_sample": "",
        **fields,
    }


STREAMED = probe_result([(50 + 20 * i, 280, 1) for i in range(50)])
BUFFERED = probe_result([(1050, 14000, 50)])
COALESCED = probe_result([(50 + 200 * i, 2800, 10) for i in range(5)])
HELD = probe_result([(1500 + 20 * i, 280, 1) for i in range(30)], t_headers_ms=1500)
FAILED = probe_result([], status=None, error="connection to 127.0.0.1:1 refused: nothing")


def verdicts(answer: dict) -> list[str]:
    return [hop["verdict"] for hop in answer["hops"]]


def test_all_hops_streaming_name_no_hop_and_exit_0():
    answer = cli.report([("upstream", STREAMED), ("gateway", STREAMED), ("edge", STREAMED)])
    assert (answer["verdict"], answer["first_buffering_hop"], answer["exit_code"]) == (
        "streamed",
        None,
        0,
    )
    assert answer["diagnosis"].startswith("Every hop streams; streamed (high confidence).")


def test_the_first_hop_that_degrades_is_named():
    answer = cli.report([("upstream", STREAMED), ("gateway", COALESCED), ("edge", BUFFERED)])
    assert answer["first_buffering_hop"] == "gateway"
    assert [hop["degrades"] for hop in answer["hops"]] == [False, True, True]
    assert (answer["verdict"], answer["exit_code"]) == ("buffered", 1)
    assert answer["diagnosis"].startswith("gateway: coalesced")


def test_a_hop_no_worse_than_the_one_before_is_not_named():
    """A head held at the gateway stays held through a healthy edge: the gateway is named."""
    answer = cli.report([("gateway", HELD), ("edge", HELD), ("public", BUFFERED)])
    assert answer["first_buffering_hop"] == "gateway"


def test_a_hop_that_could_not_be_probed_is_skipped_and_exits_2():
    answer = cli.report([("upstream", FAILED), ("gateway", STREAMED), ("edge", BUFFERED)])
    assert answer["first_buffering_hop"] == "edge"
    assert answer["exit_code"] == 2
    only_failed = cli.report([("url", FAILED)])
    assert only_failed["first_buffering_hop"] is None
    assert "could not run" in only_failed["diagnosis"] and "Fix:" in only_failed["diagnosis"]


def test_the_json_carries_what_machines_need_per_hop():
    out = io.StringIO()
    code = cli.emit([("gateway", STREAMED), ("edge", BUFFERED)], as_json=True, out=out)
    answer = json.loads(out.getvalue())
    assert code == 1
    assert {"verdict", "first_buffering_hop", "hops"} <= answer.keys()
    for hop in answer["hops"]:
        assert {"name", "url", "verdict", "ttft_ms", "reads", "tokens", "span_ms", "headers"} <= (
            hop.keys()
        )
    assert answer["hops"][1]["headers"] == {"transfer-encoding": "chunked", "server": "nginx"}


def test_the_table_has_a_row_per_hop_and_the_diagnosis():
    table = cli.render_table(cli.report([("gateway", STREAMED), ("edge", COALESCED)]))
    lines = table.splitlines()
    assert lines[0].split()[:5] == ["hop", "verdict", "TTFT", "reads/tokens", "span"]
    assert re.match(r"gateway\s+streamed\s+50 ms\s+50/50\s+980 ms\s+HTTP/1.1 te=chunked", lines[1])
    assert re.match(r"edge\s+coalesced\s+50 ms\s+5/50", lines[2])
    assert lines[-1].startswith("diagnosis: edge: coalesced")


def test_the_timeline_is_self_contained_with_a_dot_per_read(tmp_path):
    page_path = tmp_path / "doctor.html"
    cli.emit(
        [("gateway", STREAMED), ("edge", BUFFERED)], html_path=str(page_path), out=io.StringIO()
    )
    page = page_path.read_text()
    assert page.count("<circle") == 50 + 1
    assert "<svg" in page and "<script" not in page and "<link" not in page
    assert not re.search(r"""(src|href)=["']?https?:""", page)


def test_names_from_the_network_are_escaped_in_the_page():
    answer = cli.report([("<script>alert(1)</script>", STREAMED)])
    assert "<script>alert" not in cli.render_html(answer)


@pytest.mark.parametrize("argv", [[], ["http://127.0.0.1:1/", "--timeout", "0"]])
def test_usage_errors_exit_2(argv, capsys):
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2


# The whole answer in one read from a server that names no known layer: the whole-answer cause.
WHOLE_ANSWER = probe_result(
    [(1050, 14000, 50)], headers={"transfer-encoding": "chunked", "server": "uvicorn"}
)


def test_in_hop_mode_the_fix_says_where_the_layer_sits_not_to_probe_each_hop():
    """A run over every hop has probed each hop already: the fix for the hop it names must not
    send the reader to --inventory, but say where between the hops the layer is."""
    answer = cli.report([("upstream", STREAMED), ("gateway:app2", WHOLE_ANSWER)])
    gateway = answer["hops"][-1]
    assert (answer["first_buffering_hop"], gateway["cause"]) == ("gateway:app2", "whole-answer")
    assert "--inventory" not in gateway["fix"] and "--inventory" not in answer["diagnosis"]
    assert "hop before this one" in gateway["fix"], gateway["fix"]


def test_negative_control_a_run_on_one_url_is_sent_to_hop_mode():
    """The same answer probed at one URL: there the fix is to probe each hop."""
    answer = cli.report([("gateway", WHOLE_ANSWER)])
    assert answer["hops"][0]["cause"] == "whole-answer"
    assert "Probe each hop (--inventory)" in answer["hops"][0]["fix"]
    assert "Probe each hop (--inventory)" in answer["diagnosis"]


def test_a_header_passed_on_from_a_streamed_hop_is_no_evidence_against_the_next():
    """A relay in front of nginx holds the answer and passes nginx's Server header on: the relay
    is named, and not blamed on nginx, whose own hop streamed."""
    answer = cli.report([("nginx", STREAMED), ("front", BUFFERED)])
    front = answer["hops"][-1]
    assert (answer["first_buffering_hop"], front["verdict"]) == ("front", "buffered")
    assert front["cause"] == "whole-answer", front["reason"]
    assert front["headers"]["server"] == "nginx"  # still shown as it came


def test_negative_control_a_server_header_of_its_own_still_names_nginx():
    """The same buffered answer judged alone, or after a hop with another Server header: the
    header is this hop's own, and the cause is nginx's."""
    alone = cli.report([("front", BUFFERED)])["hops"][0]
    other = probe_result(STREAMED["reads"], headers={"server": "uvicorn"})
    after_other = cli.report([("gateway", other), ("nginx", BUFFERED)])["hops"][1]
    assert alone["cause"] == after_other["cause"] == "nginx-buffering-body"
