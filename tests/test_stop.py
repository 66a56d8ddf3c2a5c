"""Stop strings on streamed text: matches across token boundaries, earliest wins, include flag, held-back tail."""

from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from nbllm.engine.stop import StopChecker, StopMatch


def stream(checker: StopChecker, deltas: list[str]) -> tuple[str, StopMatch | None, str]:
    """Feed deltas as an engine would: returns (final text, match, what was streamed before finishing)."""
    text, shown = "", 0
    for delta in deltas:
        text += delta
        match = checker.check(text, len(delta))
        if match is not None:
            text = text[: match.truncate_at]
            assert len(text) >= shown, "streamed text was taken back"
            return text, match, text[:shown]
        shown = checker.safe_prefix_len(text)
    return text, None, text[:shown]


def test_stop_across_token_boundaries():
    text, match, _ = stream(StopChecker(["</end>"], False), ["Hello", " wor", "ld</", "en", "d> more"])
    assert match == StopMatch("</end>", len("Hello world"))
    assert text == "Hello world"


def test_include_stop_str_keeps_it_and_drops_what_follows():
    text, match, _ = stream(StopChecker(["</end>"], True), ["Hello</e", "nd> tail"])
    assert text == "Hello</end>" and match.stop == "</end>"


def test_earliest_ending_match_wins_whatever_the_list_order():
    for stops in (["cde", "bc"], ["bc", "cde"]):
        text, match, _ = stream(StopChecker(stops, False), ["a", "bcdef"])
        assert match.stop == "bc" and text == "a"


def test_same_end_prefers_the_longer_stop():
    text, match, _ = stream(StopChecker(["cd", "bcd"], False), ["abcd"])
    assert match.stop == "bcd" and text == "a"


def test_search_only_covers_text_that_could_hold_a_new_match():
    checker = StopChecker(["xx"], False)
    # "xx" at the start was already present before this delta, so it must not be reported now.
    assert checker.check("xx and more", len(" more")) is None
    assert checker.check("abx", 1) is None
    assert checker.check("abxx", 1) == StopMatch("xx", 2)
    assert checker.check("xx and more") == StopMatch("xx", 0), "without a delta length the whole text is searched"


def test_no_stops_and_empty_delta():
    assert StopChecker([], False).check("anything", 3) is None
    assert StopChecker(["a"], False).check("a", 0) is None
    assert StopChecker([], False).safe_prefix_len("abc") == 3


def test_held_back_tail():
    checker = StopChecker(["###", "STOP"], False)
    assert checker.safe_prefix_len("hello ##") == len("hello ")
    assert checker.safe_prefix_len("hello ST") == len("hello ")
    assert checker.safe_prefix_len("hello S#") == len("hello S")
    assert checker.safe_prefix_len("hello") == 5
    assert checker.safe_prefix_len("#") == 0
    assert StopChecker(["###"], True).safe_prefix_len("hello ##") == len("hello ##")


@given(
    text=st.text(alphabet="ab#", max_size=30),
    stops=st.lists(st.text(alphabet="ab#", min_size=1, max_size=4), min_size=1, max_size=3),
    cuts=st.lists(st.integers(0, 30), max_size=6),
    include=st.booleans(),
)
def test_any_split_into_deltas_gives_the_char_by_char_result(text, stops, cuts, include):
    checker = StopChecker(stops, include)
    bounds = sorted({0, len(text), *[c for c in cuts if c <= len(text)]})
    deltas = [text[a:b] for a, b in itertools.pairwise(bounds)]
    by_char = stream(checker, list(text))
    by_delta = stream(checker, deltas)
    assert by_delta[:2] == by_char[:2]
    assert by_delta[0].startswith(by_delta[2])
