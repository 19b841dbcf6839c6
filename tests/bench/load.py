"""One bounded load run against a server, by h2load (preferred) or the Python fallback, with its responses
checked: every call answered, and (h2load) the response bytes those calls must carry when they succeed."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from tests.bench import h2load, pyload
from tests.bench.processes import pin


@dataclass(frozen=True)
class Target:
    address: str  # 127.0.0.1:PORT
    method: str  # /pkg.Service/Method
    request: bytes  # serialized request message
    tls_ca: Path | None = None
    token: str | None = None
    metadata: tuple[tuple[str, str], ...] = ()  # more headers, e.g. Cloud Run's trace context
    streaming: bool = False
    # Response body bytes of one successful call: exact for a fixed stream, a lower bound when a field varies.
    min_response_bytes: int = 0
    exact: bool = False
    messages_per_call: int = 1
    # Dialled instead of `address`, which stays the TLS name and :authority (e.g. a front end's loopback port).
    connect_to: str | None = None


@dataclass(frozen=True)
class Load:
    seconds: float
    calls: int
    messages: int
    latencies_ms: list[float] = field(default_factory=list)  # per call, when the run was asked for them

    @property
    def rate(self) -> float:
        return self.calls / self.seconds

    @property
    def message_rate(self) -> float:
        return self.messages / self.seconds


class LoadError(RuntimeError):
    """The responses cannot be trusted (errors, or bytes that successful calls would not add up to)."""


class Generator:
    def __init__(
        self, h2load_path: str | None, core: int | None, clients: int = 4, streams: int = 32
    ) -> None:
        self.h2load = h2load_path
        self.core = core
        self.clients = clients
        self.streams = streams
        self.name = "h2load" if h2load_path else "python grpc.aio (fallback)"

    async def run(
        self,
        target: Target,
        *,
        duration_s: float | None = None,
        count: int | None = None,
        latencies: bool = False,
    ) -> Load:
        """With `latencies`, the returned Load carries every call's time (h2load's --log-file)."""
        bound = (duration_s or 0) + 120  # the wall-clock cap on top of the load's own bound
        if self.h2load:
            return await asyncio.wait_for(self._h2load(target, duration_s, count, latencies), bound)
        return await asyncio.wait_for(self._python(target, duration_s, count, latencies), bound)

    async def _h2load(
        self, target: Target, duration_s: float | None, count: int | None, latencies: bool
    ) -> Load:
        assert self.h2load is not None
        scheme = "https" if target.tls_ca else "http"
        headers: tuple[str, ...] = (f"authorization: Bearer {target.token}",) if target.token else ()
        headers += tuple(f"{key}: {value}" for key, value in target.metadata)
        with tempfile.TemporaryDirectory(prefix="bench-h2load-") as work:
            body, log = Path(work) / "body.bin", Path(work) / "times.tsv"
            body.write_bytes(h2load.grpc_frame(target.request))
            argv = h2load.command(
                self.h2load,
                f"{scheme}://{target.address}{target.method}",
                body,
                headers=headers,
                clients=self.clients,
                streams=self.streams,
                duration_s=duration_s,
                count=count,
                log_file=log if latencies else None,
                connect_to=target.connect_to,
            )
            output = await _output(argv, self.core)
            times = h2load.latencies_ms(log.read_text()) if latencies else []
        summary = h2load.parse(output)
        problems = []
        # In duration mode h2load may count a 2xx for a response that ends after the run's last "done" one.
        if summary.failed or summary.errored or summary.timeout or summary.status_2xx < summary.requests:
            problems.append(
                f"{summary.failed} failed, {summary.errored} errored, {summary.timeout} timeout, "
                f"{summary.status_2xx} 2xx of {summary.requests}"
            )
        expected = summary.requests * target.min_response_bytes
        # A gRPC error answer is trailers-only: no body. Bodies short of N successes mean errors.
        if summary.data_bytes < expected or (target.exact and summary.data_bytes != expected):
            problems.append(
                f"response bytes {summary.data_bytes} do not match {summary.requests} successful calls "
                f"({'exactly ' if target.exact else 'at least '}{expected})"
            )
        if problems or summary.requests == 0:
            raise LoadError(f"{target.method}: " + ("; ".join(problems) or "no calls completed"))
        if latencies and len(times) < summary.requests:
            raise LoadError(f"{target.method}: h2load logged {len(times)} of {summary.requests} requests")
        messages = summary.requests * target.messages_per_call
        return Load(summary.seconds, summary.requests, messages, times)

    async def _python(
        self, target: Target, duration_s: float | None, count: int | None, latencies: bool
    ) -> Load:
        header: tuple[tuple[str, str], ...] = (
            (("authorization", f"Bearer {target.token}"),) if target.token else ()
        )
        header += target.metadata
        plan = pyload.Plan(
            target=target.connect_to or target.address,
            method=target.method,
            request_hex=target.request.hex(),
            streaming=target.streaming,
            ca_file=str(target.tls_ca) if target.tls_ca else None,
            authority=(target.address if target.connect_to else "localhost") if target.tls_ca else None,
            metadata=header,
            concurrency=self.clients * self.streams,
            duration_s=duration_s,
            count=count,
            latencies=latencies,
        )
        result = json.loads(await _output(pyload.argv(plan), self.core))
        if result["ok"] != result["calls"] or result["calls"] == 0:
            raise LoadError(
                f"{target.method}: {result['calls'] - result['ok']} of {result['calls']} calls failed "
                f"(first: {result['first_error']})"
            )
        return Load(result["seconds"], result["calls"], result["messages"], result["latencies_ms"])


async def _output(argv: list[str], core: int | None) -> str:
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "PYTHONPATH": os.pathsep.join(__import__("sys").path)},
        preexec_fn=lambda: pin(core),
    )
    try:
        out, _ = await process.communicate()
    except asyncio.CancelledError:
        process.kill()
        await process.wait()
        raise
    if process.returncode != 0:
        raise LoadError(f"{argv[0]} exited with {process.returncode}: {out.decode(errors='replace')[-2000:]}")
    return out.decode(errors="replace")
