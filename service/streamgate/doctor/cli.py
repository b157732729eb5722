"""streamgate-doctor: probe a stream, judge it, and say which hop buffers it and what to change.

Any URL: `streamgate-doctor https://chat.example.org/v1/chat/completions --key ...` probes once.
Hop by hop (hops.py): the same probe at each hop of a deployment, in path order from the model
to the user; `report()` and `emit()` take those (hop name, probe result) pairs, whatever made
them. Exit status: 0 every hop streams, 1 one holds the stream (coalesced, buffered,
headers-held), 2 a probe could not run (the message says what to fix).
"""

from __future__ import annotations

import argparse
import html
import json
import sys
import urllib.parse
from pathlib import Path
from typing import TextIO

from . import hops, probe, verdict

VERDICT_COLOURS = {
    verdict.STREAMED: "#2e7d32",
    verdict.HEADERS_HELD: "#b8860b",
    verdict.COALESCED: "#e65100",
    verdict.BUFFERED: "#c62828",
    verdict.FAILED: "#757575",
}
# Short names of the headers that matter, for the terminal table.
HEADER_ABBREVIATIONS = {
    "content-encoding": "ce",
    "transfer-encoding": "te",
    "content-length": "cl",
    "x-accel-buffering": "xab",
    "via": "via",
    "server": "server",
}


def judge_hop(
    name: str, result: dict, passed_on: dict | None = None, hop_mode: bool = False
) -> dict:
    """One hop's line of the report: its name, URL, the verdict and the probe's timeline.
    `hop_mode`: one hop of a run over every hop (--inventory), as verdict.judge takes it.

    `passed_on`: the headers of the streamed hop before it. A header this hop shows with the same
    value came from behind it (a relay passing nginx's Server header on), so it is no evidence
    of what this hop did: the cause is judged without it (the report still shows it)."""
    headers = result.get("headers") or {}
    evidence = result
    if passed_on:
        # Transfer-Encoding is set by each hop itself (hop by hop): never passed on.
        own = {
            name: value
            for name, value in headers.items()
            if name.lower() == "transfer-encoding" or passed_on.get(name.lower()) != value
        }
        evidence = {**result, "headers": own}
    judged = verdict.judge(evidence, hop_mode)
    judged["headers"] = verdict.headers_that_matter(headers)
    return {
        "name": name,
        "url": result.get("url"),
        **judged,
        "status": result.get("status"),
        "http_version": result.get("http_version"),
        "alpn": result.get("alpn"),
        "error": result.get("error"),
        "usage": result.get("usage"),
        "timeline": {
            "headers_ms": result.get("t_headers_ms"),
            "end_ms": result.get("t_end_ms"),
            "reads": result.get("reads") or [],
        },
    }


def degrading_hops(judged: list[dict]) -> list[str]:
    """The hops, in path order, whose verdict is worse than the hop's before them (the first
    compared with a stream); a hop that could not be probed is skipped."""
    degrading, previous = [], verdict.STREAMED
    for hop in judged:
        current = hop["verdict"]
        if current == verdict.FAILED:
            continue
        if verdict.VERDICTS.index(current) > verdict.VERDICTS.index(previous):
            degrading.append(hop["name"])
        previous = current
    return degrading


def first_buffering_hop(judged: list[dict]) -> str | None:
    """The first hop whose verdict degrades; None when every hop streams."""
    degrading = degrading_hops(judged)
    return degrading[0] if degrading else None


def report(probed: list[tuple[str, dict]]) -> dict:
    """The doctor's answer for (hop name, probe result) pairs in path order: several hops are a
    run over every hop (--inventory), one is a run on one URL."""
    hop_mode = len(probed) > 1
    judged: list[dict] = []
    for name, result in probed:
        streamed_before = judged and judged[-1]["verdict"] == verdict.STREAMED
        passed_on = judged[-1]["headers"] if streamed_before else None
        judged.append(judge_hop(name, result, passed_on, hop_mode))
    degrading = degrading_hops(judged)
    for hop in judged:
        hop["degrades"] = hop["name"] in degrading
    verdicts = [hop["verdict"] for hop in judged]
    worst = max(verdicts, key=verdict.VERDICTS.index) if verdicts else verdict.FAILED
    first = first_buffering_hop(judged)
    return {
        "verdict": worst,
        "first_buffering_hop": first,
        "diagnosis": diagnosis(judged, first, hop_mode),
        "exit_code": verdict.exit_code(verdicts) if verdicts else 2,
        "hops": judged,
    }


def diagnosis(judged: list[dict], first: str | None, hop_mode: bool) -> str:
    """One line: which hop (in hop mode), what happened, what to change."""
    failed = [hop for hop in judged if hop["verdict"] == verdict.FAILED]
    if first is not None:
        hop = next(hop for hop in judged if hop["name"] == first)
        where = f"{hop['name']}: " if hop_mode else ""
        return (
            f"{where}{hop['verdict']} ({hop['confidence']} confidence). {hop['reason']} "
            f"Fix: {hop['fix']}"
        )
    if failed:
        hop = failed[0]
        where = f"{hop['name']}: " if hop_mode else ""
        return f"{where}the probe could not run. {hop['reason']} Fix: {hop['fix']}"
    if not judged:
        return "Nothing was probed."
    last = judged[-1]
    prefix = "Every hop streams; " if hop_mode else ""
    return f"{prefix}streamed ({last['confidence']} confidence). {last['reason']}"


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def _header_summary(hop: dict) -> str:
    headers = hop.get("headers") or {}
    parts = [hop.get("http_version") or "-"]
    if hop.get("alpn"):
        parts.append(f"alpn={hop['alpn']}")
    parts += [
        f"{short}={headers[name]}"
        for name, short in HEADER_ABBREVIATIONS.items()
        if name in headers
    ]
    parts += [name for name in verdict.CDN_MARKERS if name in headers and name != "via"]
    return " ".join(parts)


def render_table(answer: dict) -> str:
    """The terminal table and the one-line diagnosis."""
    rows = [("hop", "verdict", "TTFT", "reads/tokens", "span", "headers")]
    for hop in answer["hops"]:
        rows.append(
            (
                hop["name"],
                hop["verdict"] + ("?" if hop["confidence"] == "low" else ""),
                _ms(hop.get("ttft_ms")),
                f"{hop.get('token_reads', 0)}/{hop.get('tokens', 0)}",
                _ms(hop.get("span_ms")) if hop.get("tokens") else "-",
                _header_summary(hop),
            )
        )
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]) - 1)]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False))
        + "  "
        + row[-1]
        for row in rows
    ]
    lines.append("")
    lines.append(f"diagnosis: {answer['diagnosis']}")
    return "\n".join(lines)


def render_svg(answer: dict) -> str:
    """The timeline: one row per hop, a dot per read (area ~ tokens), a tick where the response
    head arrived; time from the moment each request was sent."""
    judged = answer["hops"]
    end_ms = max(
        [max([read[0] for read in hop["timeline"]["reads"]], default=0.0) for hop in judged] + [1.0]
    )
    label_width, plot_width, row_height, top = 230, 760, 46, 30
    height = top + row_height * len(judged) + 40

    def x(ms: float) -> float:
        return label_width + plot_width * ms / end_ms

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{label_width + plot_width + 20}" '
        f'height="{height}" font-family="sans-serif" font-size="12">'
        '<rect width="100%" height="100%" fill="white"/>'
    ]
    for tick in range(6):
        ms = end_ms * tick / 5
        parts.append(
            f'<line x1="{x(ms):.1f}" y1="{top - 8}" x2="{x(ms):.1f}" '
            f'y2="{height - 30}" stroke="#eee"/>'
            f'<text x="{x(ms):.1f}" y="{height - 14}" text-anchor="middle" fill="#555">'
            f"{ms:.0f} ms</text>"
        )
    for row, hop in enumerate(judged):
        y = top + row_height * row + row_height / 2
        colour = VERDICT_COLOURS[hop["verdict"]]
        parts.append(
            f'<text x="4" y="{y - 3:.1f}" font-weight="bold">{html.escape(hop["name"])}</text>'
            f'<text x="4" y="{y + 12:.1f}" fill="{colour}">{html.escape(hop["verdict"])}'
            f"{' (low confidence)' if hop['confidence'] == 'low' else ''}</text>"
            f'<line x1="{label_width}" y1="{y:.1f}" x2="{label_width + plot_width}" '
            f'y2="{y:.1f}" stroke="#ccc"/>'
        )
        headers_ms = hop["timeline"]["headers_ms"]
        if headers_ms is not None:
            parts.append(
                f'<line x1="{x(headers_ms):.1f}" y1="{y - 14:.1f}" x2="{x(headers_ms):.1f}" '
                f'y2="{y + 14:.1f}" stroke="#1565c0" stroke-width="2">'
                f"<title>response head at {headers_ms:.1f} ms</title></line>"
            )
        for at, size, tokens in hop["timeline"]["reads"]:
            radius = 2.0 + 1.5 * tokens**0.5 if tokens else 1.5
            fill = colour if tokens else "#9e9e9e"
            parts.append(
                f'<circle cx="{x(at):.1f}" cy="{y:.1f}" r="{min(radius, 14):.1f}" fill="{fill}" '
                f'fill-opacity="0.75"><title>{at:.1f} ms: {size} bytes, {tokens} tokens'
                "</title></circle>"
            )
    parts.append("</svg>")
    return "".join(parts)


def render_html(answer: dict) -> str:
    """A self-contained page: the timeline as inline SVG, and why and what to fix per hop;
    nothing downloaded."""
    judged = answer["hops"]
    rows = "".join(
        f"<tr><td>{html.escape(hop['name'])}</td><td>{html.escape(str(hop.get('url')))}</td>"
        f"<td style='color:{VERDICT_COLOURS[hop['verdict']]}'>{hop['verdict']}</td>"
        f"<td>{html.escape(hop['reason'])}</td><td>{html.escape(hop['fix'])}</td></tr>"
        for hop in judged
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'><title>streamgate-doctor</title>"
        "<style>body{font-family:sans-serif;margin:1.5em}td,th{border-bottom:1px solid #ddd;"
        "padding:4px 8px;text-align:left;vertical-align:top}</style></head><body>"
        f"<h1>streamgate-doctor: {html.escape(answer['verdict'])}</h1>"
        f"<p>{html.escape(answer['diagnosis'])}</p>"
        "<p>One row per hop, in path order; a dot per socket read (its area grows with the "
        "tokens it carried, grey: none), a blue tick where the response head arrived. Time "
        "counts from the moment the request was sent.</p>"
        + render_svg(answer)
        + "<table><tr><th>hop</th><th>URL</th><th>verdict</th><th>why</th><th>fix</th></tr>"
        + rows
        + "</table></body></html>\n"
    )


def emit(
    probed: list[tuple[str, dict]],
    *,
    as_json: bool = False,
    html_path: str | None = None,
    svg_path: str | None = None,
    out: TextIO | None = None,
) -> int:
    """Judge, print (table or JSON; on `out`, default stdout), write the HTML timeline if
    asked; the exit status."""
    out = out or sys.stdout
    answer = report(probed)
    if html_path:
        Path(html_path).write_text(render_html(answer), encoding="utf-8")
    if svg_path:
        Path(svg_path).write_text(render_svg(answer) + "\n", encoding="utf-8")
    if as_json:
        json.dump(answer, out, ensure_ascii=False, indent=1)
        out.write("\n")
    else:
        out.write(render_table(answer) + "\n")
    return int(answer["exit_code"])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamgate-doctor",
        description="Send one streaming request and say whether it streams, and if not, why.",
    )
    probe.add_arguments(parser, url_required=False)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--html", metavar="FILE", help="write a timeline page (one row per hop)")
    parser.add_argument("--svg", metavar="FILE", help="write the timeline alone, as an SVG image")
    hops.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.inventory is not None:
        probed = hops.probe_from_arguments(parser, args)
        return emit(probed, as_json=args.json, html_path=args.html, svg_path=args.svg)
    if args.url is None:
        parser.error("give the URL of a stream")
    result = probe.probe(probe.options_from(parser, args))
    name = urllib.parse.urlsplit(args.url).netloc or args.url
    return emit([(name, result)], as_json=args.json, html_path=args.html, svg_path=args.svg)


if __name__ == "__main__":
    sys.exit(main())
