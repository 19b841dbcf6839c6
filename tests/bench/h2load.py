"""h2load as a gRPC load generator: the request frame it posts, its command line, and its summary parsed.

h2load is by far the cheapest client (a fifth of a Python client's CPU), but it knows nothing of gRPC: it
counts HTTP/2 responses and ignores trailers, so grpc-status is checked separately (see scenarios).
"""

from __future__ import annotations

import re
import shutil
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

GRPC_HEADERS = ("content-type: application/grpc", "te: trailers")


def grpc_frame(message: bytes) -> bytes:
    """A length-prefixed gRPC message: flag 0 (uncompressed), 4-byte big-endian length, the message."""
    return b"\x00" + struct.pack(">I", len(message)) + message


@dataclass(frozen=True)
class Summary:
    seconds: float
    requests: int  # done
    succeeded: int  # HTTP 2xx (grpc-status is in trailers, which h2load ignores)
    failed: int
    errored: int
    timeout: int
    status_2xx: int
    data_bytes: int  # response body bytes (gRPC frames); a trailers-only error response has none

    @property
    def rate(self) -> float:
        return self.requests / self.seconds if self.seconds > 0 else 0.0


_FINISHED = re.compile(r"finished in ([\d.]+)(ms|s),")
_REQUESTS = re.compile(
    r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, (\d+) timeout"
)
_STATUS = re.compile(r"status codes: (\d+) 2xx")
_DATA = re.compile(r"\((\d+)\) data")


def parse(output: str) -> Summary:
    """h2load's summary; ValueError naming what is missing when the output is not one."""
    found = {}
    for name, pattern in (
        ("finished", _FINISHED),
        ("requests", _REQUESTS),
        ("status", _STATUS),
        ("data", _DATA),
    ):
        match = pattern.search(output)
        if match is None:
            raise ValueError(f"h2load output has no {name!r} line:\n{output[-2000:]}")
        found[name] = match
    finished = found["finished"]
    seconds = float(finished.group(1)) / (1000.0 if finished.group(2) == "ms" else 1.0)
    _, _, done, succeeded, failed, errored, timeout = (int(g) for g in found["requests"].groups())
    return Summary(
        seconds=seconds,
        requests=done,
        succeeded=succeeded,
        failed=failed,
        errored=errored,
        timeout=timeout,
        status_2xx=int(found["status"].group(1)),
        data_bytes=int(found["data"].group(1)),
    )


def latencies_ms(log: str) -> list[float]:
    """Per-request latencies from h2load's --log-file: tab-separated start (us since epoch), HTTP status (-1
    for a failed stream), microseconds to the end of the response. A failed request is a ValueError."""
    times = []
    for line in log.splitlines():
        if not line.strip():
            continue
        _, status, micros, *_ = line.split("\t")
        if status != "200":
            raise ValueError(f"h2load logged a request with status {status}: {line!r}")
        times.append(int(micros) / 1000.0)
    return times


def find_or_install() -> str | None:
    """The h2load executable; installs Debian's nghttp2-client when root and apt-get exist; else None."""
    path = shutil.which("h2load")
    if path:
        return path
    import os

    if os.geteuid() == 0 and shutil.which("apt-get"):
        subprocess.run(
            ["apt-get", "install", "-y", "--no-install-recommends", "nghttp2-client"],
            check=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            timeout=300,
        )
    return shutil.which("h2load")


def command(
    h2load: str,
    url: str,
    body: Path,
    *,
    headers: tuple[str, ...],
    clients: int,
    streams: int,
    duration_s: float | None = None,
    count: int | None = None,
    log_file: Path | None = None,
    connect_to: str | None = None,
) -> list[str]:
    """One h2load run, bounded by a duration or by a request count (never unbounded); with `log_file`, each
    request's time is written there (see latencies_ms); with `connect_to` (HOST:PORT), the URL's host is the
    TLS name and :authority but that address is dialled."""
    if (duration_s is None) == (count is None):
        raise ValueError("give exactly one of duration_s and count")
    argv = [h2load, "-c", str(clients), "-m", str(streams), "-t", "1", "-d", str(body)]
    if log_file is not None:
        argv += ["--log-file", str(log_file)]
    if connect_to is not None:
        argv += [f"--connect-to={connect_to}"]
    for header in (*GRPC_HEADERS, *headers):
        argv += ["-H", header]
    argv += ["-D", f"{duration_s:g}"] if duration_s is not None else ["-n", str(count)]
    return [*argv, url]
