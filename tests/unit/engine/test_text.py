"""Stop-string matching and incremental UTF-8 decoding."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from engine.text import IncrementalDetokenizer, StopMatcher


def _run(pieces: list[str], stops: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = []
    for piece in pieces:
        text, hit = matcher.feed(piece)
        out.append(text)
        if hit:
            return "".join(out), True
    text, hit = matcher.flush()
    out.append(text)
    return "".join(out), hit


def test_stop_across_token_boundaries_is_never_shown() -> None:
    assert _run(["Hello wo", "rld, ", "END", "more"], ["END"]) == ("Hello world, ", True)
    assert _run(["a<", "|st", "op|>b"], ["<|stop|>"]) == ("a", True)


def test_partial_stop_prefix_is_released_when_it_does_not_complete() -> None:
    matcher = StopMatcher(["STOP"])
    assert matcher.feed("abcST") == ("abc", False)
    assert matcher.feed("xy") == ("STxy", False)


def test_earliest_stop_wins() -> None:
    assert _run(["one two three"], ["three", "two"]) == ("one ", True)


def test_a_longer_stop_starting_earlier_wins_over_a_shorter_one_found_first() -> None:
    """Found by the property test below: "\x02" completes before "0\x020", which starts earlier."""
    assert _run(["0", "\x02", "0"], ["\x02", "0\x020"]) == ("", True)
    assert _run(["0", "\x02", "1"], ["\x02", "0\x020"]) == ("0", True)


def test_no_stops_passes_through() -> None:
    assert _run(["a", "b"], []) == ("ab", False)


@given(st.text(max_size=60), st.lists(st.text(min_size=1, max_size=5), max_size=4), st.integers(1, 7))
def test_output_is_the_text_before_the_first_stop(text: str, stops: list[str], size: int) -> None:
    pieces = [text[i : i + size] for i in range(0, len(text), size)]
    out, hit = _run(pieces, stops)
    positions = [text.find(s) for s in stops if s in text]
    if positions:
        assert hit and out == text[: min(positions)]
    else:
        assert not hit and out == text


def test_detokenizer_holds_incomplete_utf8() -> None:
    decoder = IncrementalDetokenizer()
    euro = "€".encode()
    assert decoder.feed(euro[:1]) == ""
    assert decoder.feed(euro[1:2]) == ""
    assert decoder.feed(euro[2:] + b"!") == "€!"
    assert decoder.feed(b"\xe2") == ""
    assert decoder.flush() == "\ufffd"
