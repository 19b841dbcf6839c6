"""Just enough HTTP/2 over cleartext (h2c, prior knowledge) to send gRPC frames that no gRPC client would send.

gRPC clients always frame messages correctly; to send a truncated message, a lying length prefix or a stream
that ends mid-message, this speaks HTTP/2 on a raw socket: the connection preface, SETTINGS, one HEADERS frame
(HPACK literals, no Huffman, no indexing), DATA frames as given, then reads frames until the stream ends.
Responses are decoded with a minimal HPACK decoder (static and dynamic tables; Huffman-coded strings are
reported as such, not decoded: the tests need only grpc-status, which is a plain literal or an index).

`Streams` does the same for many streams on one connection, on the `h2` library (with its `hpack`): requests
held open mid-message, as many as the server lets in, each stream's answer recorded as it comes.
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

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
DATA, HEADERS, RST_STREAM, SETTINGS, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 0, 1, 3, 4, 6, 7, 8, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY = 0x1, 0x1, 0x4, 0x8, 0x20
HUFFMAN = "<huffman>"

# RFC 7541 Appendix A.
STATIC_TABLE: list[tuple[str, str]] = [
    (":authority", ""), (":method", "GET"), (":method", "POST"), (":path", "/"), (":path", "/index.html"),
    (":scheme", "http"), (":scheme", "https"), (":status", "200"), (":status", "204"), (":status", "206"),
    (":status", "304"), (":status", "400"), (":status", "404"), (":status", "500"), ("accept-charset", ""),
    ("accept-encoding", "gzip, deflate"), ("accept-language", ""), ("accept-ranges", ""), ("accept", ""),
    ("access-control-allow-origin", ""), ("age", ""), ("allow", ""), ("authorization", ""),
    ("cache-control", ""), ("content-disposition", ""), ("content-encoding", ""), ("content-language", ""),
    ("content-length", ""), ("content-location", ""), ("content-range", ""), ("content-type", ""),
    ("cookie", ""), ("date", ""), ("etag", ""), ("expect", ""), ("expires", ""), ("from", ""), ("host", ""),
    ("if-match", ""), ("if-modified-since", ""), ("if-none-match", ""), ("if-range", ""),
    ("if-unmodified-since", ""), ("last-modified", ""), ("link", ""), ("location", ""), ("max-forwards", ""),
    ("proxy-authenticate", ""), ("proxy-authorization", ""), ("range", ""), ("referer", ""), ("refresh", ""),
    ("retry-after", ""), ("server", ""), ("set-cookie", ""), ("strict-transport-security", ""),
    ("transfer-encoding", ""), ("user-agent", ""), ("vary", ""), ("via", ""), ("www-authenticate", ""),
]  # fmt: skip


def grpc_message(payload: bytes, *, declared: int | None = None) -> bytes:
    """A gRPC length-prefixed message; `declared` makes the prefix state another length (a lie)."""
    return struct.pack(">BI", 0, len(payload) if declared is None else declared) + payload


def frame(kind: int, flags: int, stream: int, payload: bytes = b"") -> bytes:
    return struct.pack(">I", len(payload))[1:] + struct.pack(">BBI", kind, flags, stream) + payload


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append(value % 128 + 128)
        value //= 128
    out.append(value)
    return bytes(out)


def _literal(name: str, value: str) -> bytes:
    """Literal header field without indexing, new name, no Huffman (RFC 7541 6.2.2)."""
    raw_name, raw_value = name.encode(), value.encode()
    return b"\x00" + _integer(len(raw_name), 7, 0) + raw_name + _integer(len(raw_value), 7, 0) + raw_value


def request_headers(path: str, authority: str, extra: tuple[tuple[str, str], ...] = ()) -> bytes:
    fields = [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", authority),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
        *extra,
    ]
    return b"".join(_literal(name, value) for name, value in fields)


class Decoder:
    """HPACK decoding (RFC 7541) without Huffman: enough for the status and trailers a gRPC server sends."""

    def __init__(self) -> None:
        self.dynamic: list[tuple[str, str]] = []

    def _entry(self, index: int) -> tuple[str, str]:
        if index <= len(STATIC_TABLE):
            return STATIC_TABLE[index - 1]
        return self.dynamic[index - len(STATIC_TABLE) - 1]

    @staticmethod
    def _int(data: bytes, at: int, prefix_bits: int) -> tuple[int, int]:
        limit = (1 << prefix_bits) - 1
        value = data[at] & limit
        at += 1
        if value < limit:
            return value, at
        shift = 0
        while True:
            byte = data[at]
            at += 1
            value += (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value, at

    def _string(self, data: bytes, at: int) -> tuple[str, int]:
        huffman = bool(data[at] & 0x80)
        length, at = self._int(data, at, 7)
        raw = data[at : at + length]
        return (HUFFMAN if huffman else raw.decode("latin-1")), at + length

    def decode(self, block: bytes) -> list[tuple[str, str]]:
        fields: list[tuple[str, str]] = []
        at = 0
        while at < len(block):
            byte = block[at]
            if byte & 0x80:  # indexed
                index, at = self._int(block, at, 7)
                fields.append(self._entry(index))
                continue
            if byte & 0xE0 == 0x20:  # dynamic table size update
                size, at = self._int(block, at, 5)
                if size == 0:
                    self.dynamic.clear()
                continue
            indexing = byte & 0xC0 == 0x40
            index, at = self._int(block, at, 6 if indexing else 4)
            if index:
                name = self._entry(index)[0]
            else:
                name, at = self._string(block, at)
            value, at = self._string(block, at)
            fields.append((name, value))
            if indexing:
                self.dynamic.insert(0, (name, value))
        return fields


@dataclass
class Outcome:
    """What the server answered on the stream: headers, trailers, DATA bytes; or how the stream/connection ended."""

    headers: list[tuple[str, str]] = field(default_factory=list)
    data: bytes = b""
    reset: int | None = None  # RST_STREAM error code
    goaway: int | None = None  # GOAWAY error code
    closed: bool = False  # the connection closed before the stream ended

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
    """Opens a connection, sends one request on stream 1 with `data_frames` ((payload, end_stream) each),
    and reads until the stream ends, the connection closes or `timeout` passes (then TimeoutError)."""
    reader, writer = await asyncio.open_connection(host, port)
    outcome = Outcome()
    try:
        writer.write(PREFACE + frame(SETTINGS, 0, 0))
        end = not data_frames
        writer.write(
            frame(
                HEADERS,
                END_HEADERS | (END_STREAM if end else 0),
                1,
                request_headers(path, f"{host}:{port}", metadata),
            )
        )
        for payload, end_stream in data_frames:
            writer.write(frame(DATA, END_STREAM if end_stream else 0, 1, payload))
        await writer.drain()
        if close_after_send:
            return outcome
        await asyncio.wait_for(_read_until_done(reader, writer, outcome), timeout)
        return outcome
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except ConnectionError:
            pass


async def _read_until_done(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, outcome: Outcome
) -> None:
    decoder = Decoder()
    block = b""
    while True:
        try:
            head = await reader.readexactly(9)
            length = int.from_bytes(head[:3], "big")
            kind, flags, stream = head[3], head[4], int.from_bytes(head[5:9], "big") & 0x7FFFFFFF
            payload = await reader.readexactly(length)
        except (asyncio.IncompleteReadError, ConnectionError):
            outcome.closed = True
            return
        if kind == SETTINGS and not flags & ACK:
            writer.write(frame(SETTINGS, ACK, 0))
        elif kind == PING and not flags & ACK:
            writer.write(frame(PING, ACK, 0, payload))
        elif kind == GOAWAY:
            outcome.goaway = int.from_bytes(payload[4:8], "big")
        elif kind == RST_STREAM and stream == 1:
            outcome.reset = int.from_bytes(payload[:4], "big")
            return
        elif kind == DATA and stream == 1:
            outcome.data += _unpad(payload, flags)
            if length:  # keep the server's send window open
                writer.write(frame(WINDOW_UPDATE, 0, 0, struct.pack(">I", length)))
                writer.write(frame(WINDOW_UPDATE, 0, 1, struct.pack(">I", length)))
            if flags & END_STREAM:
                return
        elif kind in (HEADERS, CONTINUATION) and stream == 1:
            fragment = _unpad(payload, flags) if kind == HEADERS else payload
            if kind == HEADERS and flags & PRIORITY:
                fragment = fragment[5:]
            block += fragment
            if flags & END_HEADERS:
                outcome.headers += decoder.decode(block)
                block = b""
                if flags & END_STREAM:
                    return
        await writer.drain()


def _unpad(payload: bytes, flags: int) -> bytes:
    if flags & PADDED:
        pad = payload[0]
        return payload[1 : len(payload) - pad]
    return payload


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
        return outcome.grpc_status is not None or outcome.reset is not None or self.closed

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
        elif isinstance(event, h2.events.StreamReset) and outcome:
            outcome.reset = event.error_code
            self._pending.pop(stream, None)
        elif isinstance(event, h2.events.ConnectionTerminated):
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

    async def close(self) -> None:
        self._writer.close()
        try:
            await self._writer.wait_closed()
        except ConnectionError:
            pass
