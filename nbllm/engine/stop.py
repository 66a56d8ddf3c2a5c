"""Stop strings on streamed text: detect them as the detokenized output grows, and hold back a streamed tail
that may still become one, so a delta shown in a notebook is never taken back."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StopMatch:
    """A stop string found in the output: finish with `text[:truncate_at]` and `stop_reason = stop`."""

    stop: str
    truncate_at: int


class StopChecker:
    """Stop-string state of one output sequence (stateless beyond its settings, so cheap to keep per request).

    Which match wins when one delta completes several: the one that *ends* first (then the longest), because
    that is the one a character-by-character stream would have hit first, so the result does not depend on
    how the text was split into tokens.
    """

    def __init__(self, stop: list[str], include_stop_str_in_output: bool) -> None:
        self.stop = list(stop)
        self.include_stop_str_in_output = include_stop_str_in_output
        self._longest = max(map(len, self.stop), default=0)

    def check(self, text: str, new_len: int | None = None) -> StopMatch | None:
        """Look for a stop string ending inside the last `new_len` characters of `text` (earlier ones were
        checked at earlier steps): only the last `new_len + longest stop - 1` characters are searched, so pass
        the length of the step's delta; None searches all of `text`. The truncation drops the stop string
        (vLLM), or keeps it when `include_stop_str_in_output`; text after it is dropped either way."""
        new_len = len(text) if new_len is None else new_len
        if not self.stop or new_len <= 0:
            return None
        best: tuple[int, int, str] | None = None  # (end, -length, stop string)
        for stop_str in self.stop:
            start = text.find(stop_str, max(0, len(text) - new_len - len(stop_str) + 1))
            if start >= 0:
                candidate = (start + len(stop_str), -len(stop_str), stop_str)
                best = candidate if best is None else min(best, candidate)
        if best is None:
            return None
        end, minus_len, stop_str = best
        return StopMatch(stop_str, end if self.include_stop_str_in_output else end + minus_len)

    def safe_prefix_len(self, text: str) -> int:
        """How much of an unfinished output may be streamed: all of it but the longest tail that is a proper
        prefix of some stop string (it may yet complete into one and be cut). Nothing is held back when the stop
        string stays in the output (vLLM too), and once the request has finished everything left is streamed."""
        if self.include_stop_str_in_output or not self.stop:
            return len(text)
        for tail in range(min(len(text), self._longest - 1), 0, -1):
            suffix = text[-tail:]
            if any(s.startswith(suffix) for s in self.stop):
                return len(text) - tail
        return len(text)
