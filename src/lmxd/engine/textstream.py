"""Turning a token stream into text: whole UTF-8 characters, and stop strings held back.

A token may end halfway through a UTF-8 character, and a stop string may span tokens; both
mean some bytes cannot be shown yet. These two small state machines decide what can.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence


class TokenTextDecoder:
    """Feeds token bytes in, gets whole characters out."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, data: bytes) -> str:
        return self._decoder.decode(data)

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)


class StopMatcher:
    """Holds back text that could be the start of a stop string.

    ``feed`` returns the text safe to emit and whether a stop string has been found; once it
    has, the text up to (not including) the stop string has been emitted and nothing more is.
    """

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self._pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if self.stopped:
            return ""
        self._pending += text
        hits = [i for i in (self._pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped = True
            out, self._pending = self._pending[: min(hits)], ""
            return out
        hold = max((self._overlap(s) for s in self.stops), default=0)
        out = self._pending[: len(self._pending) - hold]
        self._pending = self._pending[len(out) :]
        return out

    def flush(self) -> str:
        out, self._pending = ("" if self.stopped else self._pending), ""
        return out

    def _overlap(self, stop: str) -> int:
        """Length of the longest suffix of the pending text that is a prefix of ``stop``."""
        for n in range(min(len(stop) - 1, len(self._pending)), 0, -1):
            if self._pending.endswith(stop[:n]):
                return n
        return 0
