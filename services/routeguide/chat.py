"""RouteChat's memory of notes: shared by every stream, bounded per location, in count and in bytes; and what
one stream is sent back, bounded per note and per stream.

RouteChat answers each note with the earlier notes at its location, oldest first (the canonical semantics).
Without a bound a 20-byte note would bring back 64 notes of 4 KiB (256 KiB), on every note of a stream. So a
note is answered with the newest earlier notes that fit in `max_reply_bytes` (64 KiB: all of them unless they
are large), still oldest first, and a stream is sent at most `max_stream_reply_bytes` (8 MiB, the board's own
size) before it ends with RESOURCE_EXHAUSTED.

Each call to `exchange` is synchronous, so on one asyncio loop no other stream can interleave between
reading the earlier notes and storing the new one; a lock makes it safe across threads as well.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from typing import Generic, NamedTuple, TypeVar

N = TypeVar("N")

DEFAULT_NOTES_PER_LOCATION = 64
DEFAULT_MAX_NOTES = 10_000
DEFAULT_MAX_NOTE_BYTES = 4096
DEFAULT_MAX_TOTAL_BYTES = 8 * 1024 * 1024
DEFAULT_MAX_REPLY_BYTES = 64 * 1024
DEFAULT_MAX_STREAM_REPLY_BYTES = DEFAULT_MAX_TOTAL_BYTES

Location = tuple[int, int]


class NoteTooLarge(ValueError):
    """A note larger than the board accepts."""


class Reply(NamedTuple, Generic[N]):
    """What one note is answered with: earlier notes, oldest first, and their size in bytes."""

    notes: list[N]
    size: int


class NoteBoard(Generic[N]):
    """Notes by location; when a cap is reached the oldest note (at that location, or overall) goes."""

    def __init__(
        self,
        notes_per_location: int = DEFAULT_NOTES_PER_LOCATION,
        max_notes: int = DEFAULT_MAX_NOTES,
        max_note_bytes: int = DEFAULT_MAX_NOTE_BYTES,
        max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
        max_reply_bytes: int = DEFAULT_MAX_REPLY_BYTES,
        max_stream_reply_bytes: int = DEFAULT_MAX_STREAM_REPLY_BYTES,
    ) -> None:
        caps = (notes_per_location, max_notes, max_note_bytes, max_total_bytes, max_reply_bytes)
        if min(*caps, max_stream_reply_bytes) < 1:
            raise ValueError("note board caps must be positive")
        self.notes_per_location = notes_per_location
        self.max_notes = max_notes
        self.max_note_bytes = max_note_bytes
        self.max_total_bytes = max_total_bytes
        self.max_reply_bytes = max_reply_bytes
        self.max_stream_reply_bytes = max_stream_reply_bytes
        # Per location, oldest first: (sequence number, note).
        self._by_location: dict[Location, deque[tuple[int, N]]] = {}
        # Every stored note, oldest first: sequence number -> (location, size).
        self._age: OrderedDict[int, tuple[Location, int]] = OrderedDict()
        self._total_bytes = 0
        self._next_sequence = 0
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._age)

    @property
    def total_bytes(self) -> int:
        return self._total_bytes

    def exchange(self, location: Location, note: N, size: int) -> Reply[N]:
        """The notes stored earlier at `location`, the newest that fit in `max_reply_bytes`, oldest first; then
        stores `note` (`size` bytes)."""
        if size > self.max_note_bytes:
            raise NoteTooLarge(f"note is {size} bytes; at most {self.max_note_bytes} are accepted")
        with self._lock:
            notes = self._by_location.get(location)
            earlier: list[N] = []
            budget = self.max_reply_bytes
            for sequence, stored in reversed(notes or ()):
                stored_size = self._age[sequence][1]
                if stored_size > budget:
                    break
                budget -= stored_size
                earlier.append(stored)
            earlier.reverse()
            if notes and len(notes) >= self.notes_per_location:
                self._forget(notes[0][0])
            sequence = self._next_sequence
            self._next_sequence += 1
            self._by_location.setdefault(location, deque()).append((sequence, note))
            self._age[sequence] = (location, size)
            self._total_bytes += size
            while len(self._age) > self.max_notes or self._total_bytes > self.max_total_bytes:
                self._forget(next(iter(self._age)))
            return Reply(earlier, self.max_reply_bytes - budget)

    def notes_at(self, location: Location) -> list[N]:
        with self._lock:
            return [stored for _, stored in self._by_location.get(location, ())]

    def _forget(self, sequence: int) -> None:
        # The oldest note overall is also the oldest at its location, so it is always at the left end.
        location, size = self._age.pop(sequence)
        notes = self._by_location[location]
        notes.popleft()
        if not notes:
            del self._by_location[location]
        self._total_bytes -= size
