"""Regex and choice compilers against Python's `re`: for each pattern, hypothesis draws strings the pattern
matches (`from_regex`) and near-misses built from the pattern's own characters, and `matches` must agree with
`re.fullmatch` on all of them. Unsupported syntax must raise `SchemaError` at compile time."""

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbllm.constrain import SchemaError, compile_choices, compile_regex

PATTERNS = [
    r"abc",
    r"a|b|cd",
    r"[a-z]+",
    r"[^a-z]*",
    r"\d{3}-\d{4}",
    r"x{2,4}y{,2}z{3,}",
    r"(ab|cd)*e?",
    r"(?:0|[1-9]\d*)(?:\.\d+)?(?:[eE][+-]?\d+)?",
    r"^[A-Z][a-z]*$",
    r"^ab|cd$",
    r"[\w.+-]+@[\w-]+\.[a-z]{2,}",
    r"\s*\S+\s*",
    r"[à-ÿ]+",
    r"[一-鿿]{1,3}",
    r"[^\x00-\x7f]",
    r"[😀-🙏]|ok",
    r"é|\u00e8|\x41",
    r"(?P<year>\d{4})-(?P<month>0[1-9]|1[0-2])",
    r"a.c",
    r"[]a-]+",
    r"[\d\-.]+",
    r"(a*)*b",
    r"(a|ab)(c|bcd)(d*)",
    r"\(\)\[\]\{\}\*\+\?\.\\\|",
    r"a{}",
    r"(a?){2,3}b",
    r"[\W\D]x",
    r"",
    r"(|a)+",
]


def _reference(pattern: str) -> re.Pattern:
    """Python's `re` with our semantics: ASCII shorthands, `$` as the end of the text."""
    return re.compile(pattern.replace("$", r"\Z"), re.ASCII)


def _near_misses(pattern: str) -> st.SearchStrategy[str]:
    alphabet = sorted(set(pattern) | set("aé1 \n-_xZ😀"))
    return st.text(st.sampled_from(alphabet), max_size=12)


@pytest.mark.parametrize("pattern", PATTERNS)
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_matches_equals_re_fullmatch(pattern: str, data: st.DataObject) -> None:
    ref = _reference(pattern)
    grammar = compile_regex(pattern)
    # Drawn with Unicode shorthands (a non-ASCII digit from `\d` is then a near miss), judged with ASCII ones.
    unicode_ref = re.compile(ref.pattern)
    text = data.draw(st.one_of(st.from_regex(unicode_ref, fullmatch=True), _near_misses(pattern)))
    assert grammar.matches(text) == (ref.fullmatch(text) is not None), text


@pytest.mark.parametrize("pattern", [
    r"(?=a)b", r"(?!a)b", r"(?<=a)b", r"(?<!a)b", r"(a)\1", r"(?P<x>a)(?P=x)", r"\bword\b", r"\Aa", r"a\Z",
    r"(?i)abc", r"a++", r"a*+", r"a$b", r"(^a)", r"x^", r"a**", r"*a", r"(a", r"a)", r"[a", r"[z-a]", r"\q",
    r"a{3,2}", r"\x4", r"[\d-z]", r"\u{41}",
])
def test_unsupported_or_invalid_syntax_raises(pattern: str) -> None:
    with pytest.raises(SchemaError, match="regex"):
        compile_regex(pattern)


def test_empty_language_is_a_compile_error() -> None:
    with pytest.raises(SchemaError, match="no string"):
        compile_regex(r"[^\x00-\U0010ffff]")


def test_bytes_steps_and_forced_bytes() -> None:
    g = compile_regex(r"hello (world|there)!")
    state = g.step_bytes(g.initial(), b"hel")
    assert g.forced_bytes(state) == b"lo "
    assert g.step(state, ord("x")) is None
    # A multi-byte character is consumed byte by byte; half a character is neither dead nor accepting.
    e = compile_regex("é")
    half = e.step(e.initial(), "é".encode()[0])
    assert half is not None and not e.accepting(half)
    assert e.accepting(e.step(half, "é".encode()[1]))
    assert compile_regex("(?<name>ab)+").matches("abab")  # ECMA-262 named group (not in Python 3.11's re)
    assert compile_regex("a").key == compile_regex("a").key != compile_regex("b").key


def test_choices() -> None:
    g = compile_choices(["New York", "New Delhi", "Paris", ""])
    assert [g.matches(t) for t in ["New York", "New Delhi", "Paris", "", "New", "Paris "]] == [
        True, True, True, True, False, False]
    assert g.forced_bytes(g.step(g.initial(), ord("N"))) == b"ew "
    for bad in ([], "abc", [1], None):
        with pytest.raises(SchemaError, match="choices"):
            compile_choices(bad)


def test_deep_nesting_compiles_or_fails_cleanly() -> None:
    assert compile_regex("(" * 800 + "a" + ")" * 800).matches("a")
    with pytest.raises(SchemaError, match="nested too deeply"):
        compile_regex("(" * 100_000 + "a" + ")" * 100_000)
