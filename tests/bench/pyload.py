"""The fallback load generator when h2load is missing: grpc.aio in its own process, pinned to its own core.

It costs about five times h2load's CPU per call, so on a small machine it may saturate before the server
does; figures from it are lower bounds. Unlike h2load it sees every call's grpc-status.
`python -m tests.bench.pyload JSON` (see `Plan`) prints {"seconds", "calls", "ok", "messages", "first_error",
"latencies_ms"}.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import grpc


@dataclass(frozen=True)
class Plan:
    target: str  # 127.0.0.1:PORT
    method: str  # /pkg.Service/Method
    request_hex: str  # the serialized request
    streaming: bool = False  # unary-stream: count the messages
    ca_file: str | None = None  # TLS when set
    authority: str | None = None
    metadata: tuple[tuple[str, str], ...] = ()
    concurrency: int = 128
    duration_s: float | None = None
    count: int | None = None
    latencies: bool = False  # report every successful call's time


def _identity(data: bytes) -> bytes:
    return data


async def run(plan: Plan) -> dict[str, Any]:
    if plan.duration_s is None and plan.count is None:
        raise ValueError("a load needs a duration or a count")
    options: list[tuple[str, Any]] = [("grpc.so_reuseport", 0)]
    if plan.authority:  # the TLS name, and the :authority a front end routes by
        options.append(("grpc.ssl_target_name_override", plan.authority))
        options.append(("grpc.default_authority", plan.authority))
    if plan.ca_file:
        with open(plan.ca_file, "rb") as ca:
            credentials = grpc.ssl_channel_credentials(ca.read())
        channel = grpc.aio.secure_channel(plan.target, credentials, options=options)
    else:
        channel = grpc.aio.insecure_channel(plan.target, options=options)
    request = bytes.fromhex(plan.request_hex)
    calls = ok = messages = 0
    first_error = ""
    times: list[float] = []
    limit = plan.count if plan.count is not None else 10**9
    deadline = time.monotonic() + (plan.duration_s if plan.duration_s is not None else 600.0)
    async with channel:
        if plan.streaming:
            stream = channel.unary_stream(plan.method, _identity, _identity)
        else:
            unary = channel.unary_unary(plan.method, _identity, _identity)

        async def worker() -> None:
            nonlocal calls, ok, messages, first_error
            while calls < limit and time.monotonic() < deadline:
                calls += 1
                started = time.perf_counter()
                try:
                    if plan.streaming:
                        async for _ in stream(request, metadata=plan.metadata, timeout=30):
                            messages += 1
                    else:
                        await unary(request, metadata=plan.metadata, timeout=30)
                        messages += 1
                    ok += 1
                    if plan.latencies:
                        times.append((time.perf_counter() - started) * 1000)
                except grpc.aio.AioRpcError as err:
                    first_error = first_error or f"{err.code().name}: {err.details()}"

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(plan.concurrency)))
        seconds = time.perf_counter() - began
    return {
        "seconds": seconds,
        "calls": calls,
        "ok": ok,
        "messages": messages,
        "first_error": first_error,
        "latencies_ms": times,
    }


if __name__ == "__main__":
    fields = json.loads(sys.argv[1])
    fields["metadata"] = tuple(tuple(m) for m in fields.get("metadata", ()))
    print(json.dumps(asyncio.run(run(Plan(**fields)))), flush=True)


def argv(plan: Plan) -> list[str]:
    return [sys.executable, "-m", "tests.bench.pyload", json.dumps(asdict(plan))]
