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
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in itertools.pairwise(bounds)]
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    expected = text[: min(hits)] if hits else text
    assert feed_all(StopMatcher(stops), pieces) == expected


@given(st.text(max_size=40), st.lists(st.integers(0, 200), max_size=8))
def test_utf8_split_anywhere_decodes_whole(text: str, cuts: list[int]) -> None:
    data = text.encode()
    bounds = sorted({0, len(data), *(c for c in cuts if c <= len(data))})
    decoder = TokenTextDecoder()
    out = "".join(decoder.feed(data[a:b]) for a, b in itertools.pairwise(bounds))
    assert out + decoder.flush() == text
