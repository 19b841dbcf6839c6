"""RouteChat's memory of notes: shared by every stream, bounded per location, in count and in bytes.

Each call to `exchange` is synchronous, so on one asyncio loop no other stream can interleave between
reading the earlier notes and storing the new one; a lock makes it safe across threads as well.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, deque
from typing import Generic, TypeVar

N = TypeVar("N")

DEFAULT_NOTES_PER_LOCATION = 64
DEFAULT_MAX_NOTES = 10_000
DEFAULT_MAX_NOTE_BYTES = 4096
DEFAULT_MAX_TOTAL_BYTES = 8 * 1024 * 1024

Location = tuple[int, int]


class NoteTooLarge(ValueError):
    """A note larger than the board accepts."""


class NoteBoard(Generic[N]):
    """Notes by location; when a cap is reached the oldest note (at that location, or overall) goes."""

    def __init__(
        self,
        notes_per_location: int = DEFAULT_NOTES_PER_LOCATION,
        max_notes: int = DEFAULT_MAX_NOTES,
        max_note_bytes: int = DEFAULT_MAX_NOTE_BYTES,
        max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    ) -> None:
        if min(notes_per_location, max_notes, max_note_bytes, max_total_bytes) < 1:
            raise ValueError("note board caps must be positive")
        self.notes_per_location = notes_per_location
        self.max_notes = max_notes
        self.max_note_bytes = max_note_bytes
        self.max_total_bytes = max_total_bytes
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

    def exchange(self, location: Location, note: N, size: int) -> list[N]:
        """The notes stored earlier at `location` (oldest first); then stores `note` (`size` bytes)."""
        if size > self.max_note_bytes:
            raise NoteTooLarge(f"note is {size} bytes; at most {self.max_note_bytes} are accepted")
        with self._lock:
            notes = self._by_location.get(location)
            earlier = [stored for _, stored in notes] if notes else []
            if notes and len(notes) >= self.notes_per_location:
                self._forget(notes[0][0])
            sequence = self._next_sequence
            self._next_sequence += 1
            self._by_location.setdefault(location, deque()).append((sequence, note))
            self._age[sequence] = (location, size)
            self._total_bytes += size
            while len(self._age) > self.max_notes or self._total_bytes > self.max_total_bytes:
                self._forget(next(iter(self._age)))
            return earlier

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
