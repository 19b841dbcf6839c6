"""A flood of HTTP/2 PING frames on one h2c connection, bounded in count and time, and what the server answered.

The pings are sent from a thread and read by another (socket calls release the GIL), so a flood does not slow
the test's own gRPC clients on the event loop.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from dataclasses import dataclass

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
SETTINGS, PING, GOAWAY = 0x4, 0x6, 0x7
ACK = 0x1
ENHANCE_YOUR_CALM = 0xB


def frame(kind: int, flags: int, payload: bytes) -> bytes:
    """An HTTP/2 frame on stream 0 (the connection)."""
    return struct.pack(">I", len(payload))[1:] + bytes([kind, flags]) + struct.pack(">I", 0) + payload


@dataclass
class Flood:
    sent: int = 0  # PINGs handed to the kernel
    acked: int = 0  # PING ACKs received
    goaway: int | None = None  # the GOAWAY's error code
    goaway_debug: str = ""  # its debug data ("too_many_pings")
    goaway_after: float | None = None  # seconds from the start
    closed_after: float | None = (
        None  # the server closed the connection (EOF or reset), seconds from the start
    )
    seconds: float = 0.0  # how long PINGs were sent


def flood(host: str, port: int, *, pings: int, seconds: float, burst: int, linger: float = 2.0) -> Flood:
    """Sends up to `pings` PINGs for at most `seconds`, `burst` per write, until the server closes the
    connection; then waits up to `linger` seconds for it to close. Blocking: run it in a thread."""
    result = Flood()
    sock = socket.create_connection((host, port), timeout=seconds + linger)
    started = time.monotonic()
    settled, closed = threading.Event(), threading.Event()

    def read() -> None:
        pending = b""
        try:
            while chunk := sock.recv(1 << 16):
                pending += chunk
                at = 0
                while len(pending) - at >= 9:
                    length = int.from_bytes(pending[at : at + 3], "big")
                    if len(pending) - at < 9 + length:
                        break
                    kind, flags = pending[at + 3], pending[at + 4]
                    payload = pending[at + 9 : at + 9 + length]
                    at += 9 + length
                    if kind == PING and flags & ACK:
                        result.acked += 1
                    elif kind == SETTINGS and not flags & ACK:
                        settled.set()
                    elif kind == GOAWAY and result.goaway is None:
                        result.goaway = int.from_bytes(payload[4:8], "big")
                        result.goaway_debug = payload[8:].decode("ascii", "replace")
                        result.goaway_after = time.monotonic() - started
                pending = pending[at:]
        except (ConnectionResetError, BrokenPipeError):
            pass
        except OSError:  # our own close or timeout: the server did not close it
            return
        result.closed_after = time.monotonic() - started
        closed.set()

    reader = threading.Thread(target=read, name="ping-flood-reader", daemon=True)
    reader.start()
    burst_bytes = b"".join(frame(PING, 0, struct.pack(">Q", n)) for n in range(burst))
    try:
        sock.sendall(PREFACE + frame(SETTINGS, 0, b""))
        settled.wait(linger)  # so that the flood is on an established connection, as a client's would be
        sock.sendall(frame(SETTINGS, ACK, b""))
        while result.sent + burst <= pings and time.monotonic() - started < seconds and not closed.is_set():
            sock.sendall(burst_bytes)
            result.sent += burst
    except OSError:  # the server closed the connection
        pass
    result.seconds = time.monotonic() - started
    closed.wait(linger)
    sock.close()
    reader.join(linger)
    return result
