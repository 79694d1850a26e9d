"""Stop strings held back across token boundaries, and UTF-8 split inside tokens."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from lmxd.engine.textstream import StopMatcher, TokenTextDecoder


def feed_all(matcher: StopMatcher, pieces: list[str]) -> str:
    out = "".join(matcher.feed(p) for p in pieces)
    return out + matcher.flush()


def test_stop_spanning_pieces() -> None:
    m = StopMatcher(["</end>"])
    assert m.feed("hello </e") == "hello "
    assert m.feed("nd> more") == ""
    assert m.stopped and m.flush() == ""


def test_false_start_is_released() -> None:
    m = StopMatcher(["STOP"])
    assert m.feed("ST") == ""
    assert m.feed("ART") == "START"


@given(
    text=st.text(alphabet="abST OP\n", max_size=60),
    cuts=st.lists(st.integers(0, 60), max_size=10),
    stops=st.lists(st.text(alphabet="abSTOP", min_size=1, max_size=4), max_size=3),
)
def test_output_is_the_text_up_to_the_first_stop(
    text: str, cuts: list[int], stops: list[str]
) -> None:
    """The output ends at the first piece after which a stop string has appeared, cut where
    the earliest of those found starts: as generation ends there, a longer stop string that
    began earlier but has not been generated whole by then does not count."""
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    expected, seen = text, ""
    for piece in pieces:
        seen += piece
        hits = [i for i in (seen.find(s) for s in stops) if i >= 0]
        if hits:
            expected = seen[: min(hits)]
            break
    assert feed_all(StopMatcher(stops), pieces) == expected


def test_a_stop_generated_whole_ends_the_text_before_a_longer_one_begun_earlier() -> None:
    # "S" is complete after the first piece; "OSO", which began one character earlier,
    # would need the next one
    assert feed_all(StopMatcher(["S", "OSO"]), ["OS", "O"]) == "O"
    assert feed_all(StopMatcher(["S", "OSO"]), ["OSO"]) == ""


@given(st.text(max_size=40), st.lists(st.integers(0, 200), max_size=8))
def test_utf8_split_anywhere_decodes_whole(text: str, cuts: list[int]) -> None:
    data = text.encode()
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    decoder = TokenTextDecoder()
    out = "".join(decoder.feed(data[a:b]) for a, b in itertools.pairwise(bounds))
    assert out + decoder.flush() == text
