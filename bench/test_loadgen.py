"""The load generator's HTTP reading, split at every byte: run with `pytest bench`."""

from __future__ import annotations

import asyncio
import multiprocessing
import time

import pytest
from loadgen import Outcome, Schedule, StreamConnection, collect_outcome, watch_loop_lag

TOKENS = [b"Hello", b" wor", b"ld\r\n", b"0\r\n\r\n", b"!"]  # includes a fake terminator
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Type: text/plain\r\n\r\n"
    + b"".join(b"%x\r\n%s\r\n" % (len(token), token) for token in TOKENS)
    + b"0\r\n\r\n"
)


def feed(response: bytes, cuts: list[int], sse: bool = False) -> StreamConnection:
    loop = asyncio.new_event_loop()
    try:
        conn = StreamConnection(sse)
        conn.done = loop.create_future()
        for start, end in zip([0, *cuts], [*cuts, len(response)], strict=True):
            conn.data_received(response[start:end])
        return conn
    finally:
        loop.close()


@pytest.mark.parametrize("cut", range(1, len(CHUNKED)))
def test_chunked_body_decodes_wherever_the_reads_split(cut):
    conn = feed(CHUNKED, [cut])
    assert conn.done.done() and conn.status == 200
    assert conn.body() == b"".join(TOKENS)


def test_every_read_with_payload_is_one_arrival():
    header_end = CHUNKED.index(b"\r\n\r\n") + 4
    cuts = [header_end]
    position = header_end
    for token in TOKENS:
        position += len(b"%x\r\n%s\r\n" % (len(token), token))
        cuts.append(position)
    conn = feed(CHUNKED, cuts)
    assert conn.content_arrivals == len(TOKENS)
    assert len(conn.gaps) == len(TOKENS) - 1


def test_negative_control_a_truncated_stream_never_completes():
    conn = feed(CHUNKED[:-5], [])  # the last chunk's "0\r\n\r\n" is missing
    assert not conn.done.done()


def test_sse_arrivals_count_only_content_deltas():
    role = b'data: {"choices":[{"delta":{"role":"assistant","content":""}}]}\n\n'
    token = b'data: {"choices":[{"delta":{"content":"Hi"}}]}\n\n'
    done = b"data: [DONE]\n\n"
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    frames = [b"%x\r\n%s\r\n" % (len(part), part) for part in (role, token, token, done)]
    response = head + b"".join(frames) + b"0\r\n\r\n"
    cuts, position = [], len(head)
    for frame in frames:
        position += len(frame)
        cuts.append(position)
    conn = feed(response, cuts, sse=True)
    assert conn.done.done()
    assert conn.content_arrivals == 2


def test_chunks_tell_a_late_read_from_a_merge_before_the_client():
    """Two chunks in one read: sent apart, read late here. One chunk carrying two tokens: a hop
    before this client read them together. The benchmark tells the two apart by these counts."""
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    apart = b"5\r\nHello\r\n6\r\n world\r\n"
    late = feed(head + apart + b"0\r\n\r\n", [len(head)])
    assert (late.content_arrivals, late.decoder.payload_chunks) == (1, 2)
    merged = feed(head + b"b\r\nHello world\r\n0\r\n\r\n", [len(head)])
    assert (merged.content_arrivals, merged.decoder.payload_chunks) == (1, 1)
    separate = feed(head + apart + b"0\r\n\r\n", [len(head), len(head) + 10])
    assert (separate.content_arrivals, separate.decoder.payload_chunks) == (2, 2)


@pytest.mark.parametrize("blocked_s", [0.0, 0.2])
def test_loop_lag_is_the_longest_the_event_loop_was_held(blocked_s):
    """A callback that holds the loop 200 ms shows as a lag of at least that; none, far less."""

    async def main() -> Outcome:
        outcome = Outcome()
        now = time.monotonic()
        schedule = Schedule(now, 0.0, now, now + 0.5, 1.0)
        loop = asyncio.get_running_loop()
        loop.call_later(0.1, time.sleep, blocked_s)  # holds the whole loop, as a stall would
        await watch_loop_lag(schedule, outcome)
        return outcome

    lag_s = asyncio.run(main()).loop_lag_max_s
    if blocked_s:
        assert lag_s >= blocked_s - 0.006  # the probe may have slept through part of it
    else:
        assert lag_s < 0.1


def _report_completed(conn, completed: int) -> None:
    conn.send(Outcome(completed=completed))


def _never_report(conn, _completed: int) -> None:
    time.sleep(60)


def test_collect_outcome_merges_every_generator_and_counts_a_lost_one():
    """Two generators report; one never does: it is counted lost and killed, by its own PID."""
    workers = []
    for target, completed in ((_report_completed, 3), (_report_completed, 4), (_never_report, 0)):
        receiver, sender = multiprocessing.Pipe(duplex=False)
        process = multiprocessing.Process(target=target, args=(sender, completed))
        process.start()
        workers.append((process, receiver))
    outcome = collect_outcome(workers, time.monotonic() + 2.0)
    assert outcome.completed == 7
    assert outcome.errors == {"loadgen-lost": 1}
    assert not any(process.is_alive() for process, _ in workers)
