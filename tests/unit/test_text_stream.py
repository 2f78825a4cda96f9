"""Incremental decoding and stop strings (app/engine/backends/text_stream.py) with small fake decoders."""

from __future__ import annotations

from typing import Sequence

import pytest

from app.engine.backends.text_stream import IncrementalDecoder, StopMatcher, TextStream


class ByteDecoder:
    """A byte-level tokenizer: every id is one byte; incomplete UTF-8 decodes to U+FFFD (as HF's do)."""

    def __init__(self) -> None:
        self.calls: list[int] = []  # the length of every id list decoded

    def decode(self, ids: Sequence[int]) -> str:
        self.calls.append(len(ids))
        return bytes(ids).decode("utf-8", errors="replace")


def byte_ids(text: str) -> list[int]:
    return list(text.encode("utf-8"))


class PieceDecoder:
    """A SentencePiece-like tokenizer: pieces with ``▁`` for a space; a decoded text never starts with
    the space of its first piece (so decoding a window alone differs from decoding it in context)."""

    def __init__(self, pieces: list[str]) -> None:
        self.pieces = pieces

    def decode(self, ids: Sequence[int]) -> str:
        return "".join(self.pieces[i] for i in ids).replace("▁", " ").removeprefix(" ")


def push_all(decoder: IncrementalDecoder, ids: list[int]) -> list[str]:
    return [decoder.push(i) for i in ids]


# -- IncrementalDecoder ---------------------------------------------------------------------------
def test_ascii_comes_out_one_token_at_a_time() -> None:
    dec = IncrementalDecoder(ByteDecoder())
    assert push_all(dec, byte_ids("hello")) == list("hello")
    assert dec.flush() == ""


@pytest.mark.parametrize("char", ["é", "€", "😀", "✓"])
def test_a_character_split_over_tokens_is_held_until_its_last_byte(char: str) -> None:
    ids = byte_ids("a" + char + "b")
    dec = IncrementalDecoder(ByteDecoder())
    deltas = push_all(dec, ids)
    n = len(char.encode("utf-8"))
    assert deltas == ["a", *[""] * (n - 1), char, "b"]
    assert "\ufffd" not in "".join(deltas)


def test_consecutive_multibyte_characters_come_out_whole_and_in_order() -> None:
    text = "日本語😀ü"
    dec = IncrementalDecoder(ByteDecoder())
    deltas = [d for d in push_all(dec, byte_ids(text)) if d]
    assert deltas == list(text)


def test_flush_gives_an_incomplete_character_at_the_very_end() -> None:
    dec = IncrementalDecoder(ByteDecoder())
    cut = "€".encode("utf-8")[:2]  # the model stopped inside a character
    assert push_all(dec, [ord("x"), *cut]) == ["x", "", ""]
    assert dec.flush() == cut.decode("utf-8", errors="replace")
    assert dec.flush() == ""  # nothing twice


def test_text_that_really_ends_in_a_replacement_character_is_only_released_by_flush() -> None:
    dec = IncrementalDecoder(ByteDecoder())
    assert push_all(dec, byte_ids("ok\ufffd")) == ["o", "k", "", "", ""]
    assert dec.flush() == "\ufffd"


def test_an_invalid_byte_followed_by_text_is_not_held_forever() -> None:
    dec = IncrementalDecoder(ByteDecoder())
    assert dec.push(0xFF) == ""
    assert dec.push(ord("A")) == "\ufffdA"


def test_spaces_that_depend_on_the_previous_piece_are_kept() -> None:
    pieces = ["▁Hello", "▁world", "!", "▁How", "▁are", "▁you"]
    dec = IncrementalDecoder(PieceDecoder(pieces))
    deltas = push_all(dec, list(range(len(pieces))))
    assert "".join(deltas) == "Hello world! How are you"
    assert deltas[1] == " world" and deltas[3] == " How"


def test_a_token_that_decodes_to_nothing_is_carried_into_the_next() -> None:
    pieces = ["a", "", "b"]  # a skipped special token in the middle
    dec = IncrementalDecoder(PieceDecoder(pieces))
    assert push_all(dec, [0, 1, 2]) == ["a", "", "b"]


def test_only_a_short_window_is_decoded_each_time() -> None:
    decoder = ByteDecoder()
    dec = IncrementalDecoder(decoder)
    push_all(dec, byte_ids("x" * 500 + "€" * 100))
    # the window is the last emitted piece plus what is held: never the whole text
    assert max(decoder.calls) <= 6


# -- StopMatcher ------------------------------------------------------------------------------------
def feed(matcher: StopMatcher, pieces: list[str]) -> tuple[list[str], bool]:
    out = []
    for piece in pieces:
        text, stopped = matcher.push(piece)
        out.append(text)
        if stopped:
            return out, True
    return out, False


def test_without_stops_text_passes_straight_through() -> None:
    for matcher in (StopMatcher([]), StopMatcher([""])):  # an empty stop string is no stop
        assert matcher.push("abc") == ("abc", False)
        assert matcher.flush() == ""


def test_stop_inside_one_push_cuts_there_and_drops_the_rest() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.push("hello END and more") == ("hello ", True)
    assert matcher.flush() == ""


def test_stop_split_across_pushes_is_held_back_then_cut() -> None:
    out, stopped = feed(StopMatcher(["END"]), ["Hel", "lo E", "N", "D more"])
    assert stopped and out == ["Hel", "lo ", "", ""]


def test_a_held_prefix_that_does_not_become_a_stop_is_released() -> None:
    matcher = StopMatcher(["END"])
    assert matcher.push("xE") == ("x", False)
    assert matcher.push("N") == ("", False)
    assert matcher.push("x") == ("ENx", False)
    assert matcher.push("E") == ("", False)
    assert matcher.flush() == "E"  # the end of the text: what was held is the model's output


def test_the_longest_possible_stop_prefix_is_held() -> None:
    matcher = StopMatcher(["aab"])
    assert [matcher.push(c) for c in "aaa"] == [("", False), ("", False), ("a", False)]
    assert matcher.push("b") == ("", True)


def test_a_stop_of_one_character_in_each_push() -> None:
    out, stopped = feed(StopMatcher(["\n"]), list("ab\ncd"))
    assert stopped and "".join(out) == "ab"


@pytest.mark.parametrize("stops", [["abc", "bcd"], ["bcd", "abc"]])
def test_overlapping_stops_cut_at_the_earliest(stops: list[str]) -> None:
    out, stopped = feed(StopMatcher(stops), ["xab", "cd"])
    assert stopped and "".join(out) == "x"


def test_a_stop_that_begins_inside_another_held_prefix_still_cuts_early() -> None:
    # "bcd" appears before "abcz" could complete
    out, stopped = feed(StopMatcher(["abcz", "bcd"]), ["a", "b", "c", "d"])
    assert stopped and "".join(out) == "a"


def test_a_stop_that_is_a_prefix_of_another() -> None:
    out, stopped = feed(StopMatcher(["abc", "ab"]), ["x", "a", "b"])
    assert stopped and "".join(out) == "x"


def test_holding_for_the_longer_of_two_stops() -> None:
    matcher = StopMatcher(["END", "</s>"])
    assert matcher.push("text </") == ("text ", False)
    assert matcher.push("s") == ("", False)
    assert matcher.push(">") == ("", True)


def test_stops_in_multibyte_text() -> None:
    out, stopped = feed(StopMatcher(["。\n"]), ["日本", "語。", "\n次"])
    assert stopped and "".join(out) == "日本語"


def test_emitted_text_plus_flush_is_the_input_when_no_stop_appears() -> None:
    text = "a stop-free text with E, EN and </ in it </"
    matcher = StopMatcher(["END", "</s>"])
    out = [matcher.push(c)[0] for c in text]
    assert "".join(out) + matcher.flush() == text


# -- TextStream ---------------------------------------------------------------------------------------
def test_stop_spanning_a_character_split_over_tokens() -> None:
    stream = TextStream(ByteDecoder(), ["b€"])
    results = [stream.push(i) for i in byte_ids("ab€c")]
    assert results[0] == ("a", False)
    assert all(r == ("", False) for r in results[1:-2])
    assert results[-2] == ("", True)  # the € completed the stop


def test_finish_releases_a_held_stop_prefix_and_an_incomplete_character() -> None:
    stream = TextStream(ByteDecoder(), ["END"])
    pushed = "".join(stream.push(i)[0] for i in [*byte_ids("xEN"), 0xE2])
    assert pushed == "x"
    assert stream.finish() == "EN" + b"\xe2".decode("utf-8", errors="replace")


def test_finish_cuts_a_stop_completed_by_the_flushed_tail() -> None:
    # the last bytes are held by the decoder; flushing them completes the stop "\ufffd"
    stream = TextStream(ByteDecoder(), ["!\ufffd"])
    pushed = "".join(stream.push(i)[0] for i in [*byte_ids("hi!"), 0xE2])
    assert pushed == "hi"
    assert stream.finish() == ""
