import pytest

from services.routeguide.chat import NoteBoard, NoteTooLarge


def test_returns_earlier_notes_at_the_same_location_then_stores() -> None:
    board: NoteBoard[str] = NoteBoard()
    assert board.exchange((1, 1), "a", 1).notes == []
    assert board.exchange((2, 2), "elsewhere", 9).notes == []
    assert board.exchange((1, 1), "b", 1).notes == ["a"]
    assert board.exchange((1, 1), "c", 1).notes == ["a", "b"]
    assert board.notes_at((2, 2)) == ["elsewhere"]
    assert len(board) == 4 and board.total_bytes == 12


def test_cap_per_location_evicts_the_oldest_there() -> None:
    board: NoteBoard[int] = NoteBoard(notes_per_location=3)
    board.exchange((9, 9), -1, 1)
    for note in range(10):
        board.exchange((1, 1), note, 1)
    assert board.notes_at((1, 1)) == [7, 8, 9]
    assert board.notes_at((9, 9)) == [-1]
    assert len(board) == 4 and board.total_bytes == 4


def test_total_cap_evicts_the_oldest_anywhere() -> None:
    board: NoteBoard[int] = NoteBoard(notes_per_location=10, max_notes=5)
    for note in range(12):
        board.exchange((note % 3, 0), note, 1)
    assert len(board) == 5
    assert sorted(board.notes_at((0, 0)) + board.notes_at((1, 0)) + board.notes_at((2, 0))) == [
        7,
        8,
        9,
        10,
        11,
    ]
    assert board.notes_at((1, 0)) == [7, 10]


def test_flooding_one_location_keeps_memory_bounded() -> None:
    board: NoteBoard[int] = NoteBoard(notes_per_location=2, max_notes=100)
    for note in range(10_000):
        board.exchange((1, 1), note, 1)
    assert board.notes_at((1, 1)) == [9_998, 9_999]
    assert len(board) == 2 and len(board._age) == 2 and len(board._by_location) == 1


def test_byte_cap_and_note_size_limit() -> None:
    board: NoteBoard[str] = NoteBoard(max_note_bytes=100, max_total_bytes=250)
    for number in range(5):
        board.exchange((number, 0), f"n{number}", 100)
    assert board.total_bytes == 200 and len(board) == 2
    assert board.notes_at((0, 0)) == [] and board.notes_at((4, 0)) == ["n4"]
    with pytest.raises(NoteTooLarge, match="101 bytes; at most 100"):
        board.exchange((0, 0), "big", 101)
    assert len(board) == 2  # a rejected note is not stored


def test_cap_of_one_per_location() -> None:
    board: NoteBoard[str] = NoteBoard(notes_per_location=1)
    assert board.exchange((1, 1), "a", 1).notes == []
    assert board.exchange((1, 1), "b", 1).notes == ["a"]
    assert board.exchange((1, 1), "c", 1).notes == ["b"]
    assert len(board) == 1


def test_caps_must_be_positive() -> None:
    with pytest.raises(ValueError):
        NoteBoard(max_notes=0)


def test_a_reply_is_the_newest_earlier_notes_that_fit_oldest_first() -> None:
    board: NoteBoard[str] = NoteBoard(max_reply_bytes=25)
    for number in range(5):
        board.exchange((1, 1), f"n{number}", 10)
    reply = board.exchange((1, 1), "probe", 1)
    assert reply.notes == ["n3", "n4"] and reply.size == 20  # a third 10-byte note would pass 25 bytes
    assert board.exchange((1, 1), "again", 1).notes == ["n3", "n4", "probe"]  # 21 bytes
