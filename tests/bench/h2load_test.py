from __future__ import annotations

from pathlib import Path

import pytest

from tests.bench.h2load import command, grpc_frame, latencies_ms, parse

OUTPUT = """starting benchmark...
finished in 10.00s, 5123.40 req/s, 1.02MB/s
requests: 51234 total, 51362 started, 51234 done, 51230 succeeded, 4 failed, 0 errored, 0 timeout
status codes: 51230 2xx, 0 3xx, 0 4xx, 0 5xx
traffic: 10.27MB (10766216) total, 352.31KB (360766) headers (space savings 93.72%), 4.25MB (4457358) data
"""


def test_frame_is_length_prefixed() -> None:
    assert grpc_frame(b"abc") == b"\x00\x00\x00\x00\x03abc"


def test_parse_reads_counts_and_data_bytes() -> None:
    summary = parse(OUTPUT)
    assert (summary.requests, summary.succeeded, summary.failed, summary.status_2xx) == (
        51234,
        51230,
        4,
        51230,
    )
    assert summary.data_bytes == 4457358
    assert summary.rate == pytest.approx(5123.4)


def test_parse_rejects_other_output() -> None:
    with pytest.raises(ValueError, match="finished"):
        parse("h2load: connection refused")


def test_command_is_always_bounded() -> None:
    argv = command("h2load", "http://127.0.0.1:1/x", Path("b"), headers=(), clients=1, streams=1, count=10)
    assert argv[-3:] == ["-n", "10", "http://127.0.0.1:1/x"]
    with pytest.raises(ValueError):
        command("h2load", "u", Path("b"), headers=(), clients=1, streams=1)


def test_latencies_come_from_the_log_in_milliseconds() -> None:
    log = "1764190000000000\t200\t1500\n1764190000000100\t200\t250\t0\n\n"
    assert latencies_ms(log) == [1.5, 0.25]


def test_a_failed_request_in_the_log_is_an_error() -> None:
    with pytest.raises(ValueError, match="status -1"):
        latencies_ms("1764190000000000\t200\t1500\n1764190000000100\t-1\t250\n")


def test_command_asks_for_the_log_when_given_one() -> None:
    argv = command(
        "h2load", "u", Path("b"), headers=(), clients=1, streams=1, duration_s=1, log_file=Path("times.tsv")
    )
    assert argv[argv.index("--log-file") + 1] == "times.tsv"
