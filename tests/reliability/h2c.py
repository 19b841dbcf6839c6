"""Just enough HTTP/2 over cleartext (h2c, prior knowledge), on the `h2` library, to send gRPC requests that no
gRPC client would send: a truncated message, a lying length prefix, a stream that ends mid-message, a header
value outside ASCII, requests held open mid-message, as many as the server lets in.

`exchange` sends one such request on a connection of its own; `Streams` carries many on one connection, each
sent as far as the server's flow control allows. Each stream's answer (headers, trailers, DATA, reset) is
recorded in an `Outcome`.
"""

from __future__ import annotations

import asyncio
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import h2.config
import h2.connection
import h2.events
import h2.exceptions


def grpc_message(payload: bytes, *, declared: int | None = None) -> bytes:
    """A gRPC length-prefixed message; `declared` makes the prefix state another length (a lie)."""
    return struct.pack(">BI", 0, len(payload) if declared is None else declared) + payload


@dataclass
class Outcome:
    """What the server answered on the stream: headers, trailers, DATA bytes; or how the stream/connection ended."""

    headers: list[tuple[str, str]] = field(default_factory=list)
    data: bytes = b""
    reset: int | None = None  # RST_STREAM error code
    goaway: int | None = None  # GOAWAY error code
    closed: bool = False  # the connection closed before the stream ended
    ended: bool = False  # the server ended the stream (END_STREAM)

    def value(self, name: str) -> str | None:
        found = [v for n, v in self.headers if n == name]
        return found[-1] if found else None

    @property
    def grpc_status(self) -> int | None:
        value = self.value("grpc-status")
        return int(value) if value is not None and value.isdigit() else None


async def exchange(
    host: str,
    port: int,
    path: str,
    data_frames: list[tuple[bytes, bool]],
    *,
    close_after_send: bool = False,
    metadata: tuple[tuple[str, str], ...] = (),
    timeout: float = 10.0,
) -> Outcome:
    """Opens a connection, sends one request with the bytes of `data_frames` ((payload, end_stream) each; only
    the last may end the stream), and reads until the stream ends, the connection closes or `timeout` passes
    (then TimeoutError). With `close_after_send`, the connection is closed once the request is sent."""
    if any(end for _, end in data_frames[:-1]):
        raise ValueError("only the last DATA frame can end the stream")
    streams = await Streams.open(host, port)
    try:
        body = b"".join(payload for payload, _ in data_frames)
        stream = streams.start(path, metadata, body, end=not data_frames or data_frames[-1][1])
        outcome = streams.outcomes[stream]
        if close_after_send:
            await streams.drain()
            return outcome
        if not await streams.pump(lambda: streams.done(stream), timeout):
            raise asyncio.TimeoutError(f"no answer on {path} within {timeout} s")
        outcome.closed = streams.closed and not outcome.ended
        return outcome
    finally:
        await streams.close()


class Streams:
    """One h2c connection carrying many gRPC requests, each sent as far as the server's flow control allows.

    `start` opens a stream (headers, then `body` as DATA, END_STREAM only if `end`); `pump` reads the server's
    frames and sends more of each pending body as windows open, until a condition holds or time runs out.
    `outcomes[stream]` holds what came back: headers, trailers, reset.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, authority: str) -> None:
        self._reader, self._writer, self._authority = reader, writer, authority
        config = h2.config.H2Configuration(
            client_side=True,
            header_encoding=None,
            validate_outbound_headers=False,  # send what a careful client would not
            normalize_outbound_headers=False,
            validate_inbound_headers=False,
        )
        self._h2 = h2.connection.H2Connection(config=config)
        self._pending: dict[int, tuple[memoryview, bool]] = {}  # body still to send, END_STREAM after it
        self.outcomes: dict[int, Outcome] = {}
        self.closed = False

    @classmethod
    async def open(cls, host: str, port: int) -> Streams:
        reader, writer = await asyncio.open_connection(host, port)
        streams = cls(reader, writer, f"{host}:{port}")
        streams._h2.initiate_connection()
        streams._flush()
        return streams

    def start(
        self, path: str, metadata: tuple[tuple[str, str], ...] = (), body: bytes = b"", *, end: bool = False
    ) -> int:
        stream = self._h2.get_next_available_stream_id()
        headers = [
            (b":method", b"POST"),
            (b":scheme", b"http"),
            (b":path", path.encode()),
            (b":authority", self._authority.encode()),
            (b"content-type", b"application/grpc"),
            (b"te", b"trailers"),
            *((name.encode(), value.encode()) for name, value in metadata),
        ]
        self._h2.send_headers(stream, headers, end_stream=end and not body)
        self.outcomes[stream] = Outcome()
        if body:
            self._pending[stream] = (memoryview(body), end)
        self._send_pending()
        return stream

    def done(self, stream: int) -> bool:
        outcome = self.outcomes[stream]
        return outcome.ended or outcome.grpc_status is not None or outcome.reset is not None or self.closed

    def sent_everything(self) -> bool:
        return not self._pending

    @property
    def server_max_streams(self) -> int:
        """SETTINGS_MAX_CONCURRENT_STREAMS as the server announced it (h2's "unbounded" if it did not)."""
        return int(self._h2.remote_settings.max_concurrent_streams)

    async def pump(self, until: Callable[[], bool], timeout: float) -> bool:
        """Reads and sends until `until()` holds (True), or `timeout` passes or the connection closes (False)."""
        deadline = time.monotonic() + timeout
        while not until():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or self.closed:
                return until()
            try:
                data = await asyncio.wait_for(self._reader.read(1 << 16), remaining)
            except asyncio.TimeoutError:
                return until()
            if not data:
                self.closed = True
                continue
            for event in self._h2.receive_data(data):
                self._on(event)
            self._send_pending()
        return True

    def _on(self, event: h2.events.Event) -> None:
        stream = getattr(event, "stream_id", 0)
        outcome = self.outcomes.get(stream)
        if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)) and outcome:
            outcome.headers += [(n.decode("latin-1"), v.decode("latin-1")) for n, v in event.headers]
        elif isinstance(event, h2.events.DataReceived):
            if outcome:
                outcome.data += event.data
            self._h2.acknowledge_received_data(event.flow_controlled_length, stream)
        elif isinstance(event, h2.events.StreamEnded) and outcome:
            outcome.ended = True
        elif isinstance(event, h2.events.StreamReset) and outcome:
            outcome.reset = event.error_code
            self._pending.pop(stream, None)
        elif isinstance(event, h2.events.ConnectionTerminated):  # GOAWAY
            for each in self.outcomes.values():
                each.goaway = event.error_code
            self.closed = True

    def _send_pending(self) -> None:
        for stream, (body, end) in list(self._pending.items()):
            del self._pending[stream]
            if self.done(stream):  # answered: the rest of its body would only be discarded
                continue
            try:
                while body and (window := self._h2.local_flow_control_window(stream)) > 0:
                    size = min(len(body), window, self._h2.max_outbound_frame_size)
                    self._h2.send_data(stream, bytes(body[:size]), end_stream=end and size == len(body))
                    body = body[size:]
            except h2.exceptions.StreamClosedError:
                continue
            if body:
                self._pending[stream] = (body, end)
        self._flush()

    def _flush(self) -> None:
        if data := self._h2.data_to_send():
            self._writer.write(data)

    async def drain(self) -> None:
        """Until what was sent is handed to the kernel."""
        await self._writer.drain()

    async def close(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except ConnectionError:
            pass
