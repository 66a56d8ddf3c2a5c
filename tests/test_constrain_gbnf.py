"""GBNF compiler: llama.cpp's example grammars (arithmetic, json, list, chess) on hand cases and against
references (`json.loads`, a bracket counter, the equivalent regex under `re.fullmatch`), and syntax errors."""

import json
import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbllm.constrain import SchemaError, compile_grammar

# From llama.cpp's grammars/ directory.
ARITHMETIC = r"""
root  ::= (expr "=" ws term "\n")+
expr  ::= term ([-+*/] term)*
term  ::= ident | num | "(" ws expr ")" ws
ident ::= [a-z] [a-z0-9_]* ws
num   ::= [0-9]+ ws
ws    ::= [ \t\n]*
"""

JSON = r"""
root   ::= object
value  ::= object | array | string | number | ("true" | "false" | "null") ws

object ::=
  "{" ws (
            string ":" ws value
    ("," ws string ":" ws value)*
  )? "}" ws

array  ::=
  "[" ws (
            value
    ("," ws value)*
  )? "]" ws

string ::=
  "\"" (
    [^"\\\x7F\x00-\x1F] |
    "\\" (["\\bfnrt] | "u" [0-9a-fA-F]{4}) # escapes
  )* "\"" ws

number ::= ("-"? ([0-9] | [1-9] [0-9]{0,15})) ("." [0-9]+)? ([eE] [-+]? [0-9] [1-9]{0,15})? ws

# Optional space: by convention, applied in this grammar after literal chars when allowed
ws ::= | " " | "\n" [ \t]{0,20}
"""

LIST = r"""
root ::= item+

# Excludes various line break characters
item ::= "- " [^\r\n\x0b\x0c\x85\u2028\u2029]+ "\n"
"""

CHESS = r"""
# Specifies chess moves as a list in algebraic notation, using PGN conventions

# Force first move to "1. ", then any 1-2 digit number after, relying on model to follow the pattern
root    ::= "1. " move " " move "\n" ([1-9] [0-9]? ". " move " " move "\n")+
move    ::= (pawn | nonpawn | castle) [+#]?

# piece type, optional file/rank, optional capture, dest file & rank
nonpawn ::= [NBKQR] [a-h]? [1-8]? "x"? [a-h] [1-8]

# optional file & capture, dest file & rank, optional promotion
pawn    ::= ([a-h] "x")? [a-h] [1-8] ("=" [NBKQR])?

castle  ::= "O-O" "-O"?
"""


@pytest.mark.parametrize(("grammar", "good", "bad"), [
    (ARITHMETIC, ["x=1\n", "(a +2)*b3 = c\n1=2\n", "foo_1*(2-bar)=7 \n"], ["x=1", "=1\n", "X=1\n", "(a=1\n"]),
    (JSON, ['{}', '{"a": 1}', '{"a": [1, 2.5, -3e4, "x\\n", true, null, {"b": {}}]}', '{\n  "k": "é"\n}'],
     ['[]', '{"a": 01}', '{"a": 1,}', '{"a" 1}', '{"a": tru}', '{"a": "\x01"}']),
    (LIST, ["- a\n", "- milk\n- eggs 🥚\n"], ["", "- \n", "-a\n", "- a", "- a\u2028b\n"]),
    (CHESS, ["1. e4 e5\n2. Nf3 Nc6\n", "1. d4 d5\n2. c4 dxc4\n10. O-O O-O-O+\n", "1. e4 e5\n2. e8=Q# Kxe8\n"],
     ["1. e4 e5\n", "1. e4 e5\n2. Ni3 Nc6\n", "1. e4\n2. e5 e6\n", "2. e4 e5\n3. d4 d5\n"]),
])
def test_llama_cpp_example_grammars(grammar: str, good: list[str], bad: list[str]) -> None:
    g = compile_grammar(grammar)
    for text in good:
        assert g.matches(text), text
    for text in bad:
        assert not g.matches(text), text


_TEXT = st.text(st.characters(exclude_characters="\x7f", exclude_categories=("Cs",)), max_size=6)  # json.gbnf
_JSON_VALUES = st.recursive(  # forbids a raw DEL
    st.none() | st.booleans() | st.integers(-10**15, 10**15) | _TEXT,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_TEXT, inner, max_size=3),
    max_leaves=10)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(_TEXT, _JSON_VALUES, max_size=4), st.sampled_from([None, 2]), st.data())
def test_json_grammar_against_json_loads(obj: dict, indent: int | None, data: st.DataObject) -> None:
    g = compile_grammar(JSON)
    text = json.dumps(obj, indent=indent, ensure_ascii=data.draw(st.booleans()))
    assert g.matches(text)
    # A corrupted document: the grammar agrees with the parser whenever the parser rejects it.
    cut = data.draw(st.integers(0, len(text)))
    broken = text[:cut] + data.draw(st.sampled_from(["", ",", "}", '"', "x", "]"])) + text[cut + 1:]
    try:
        json.loads(broken)
    except ValueError:
        assert not g.matches(broken), broken


BALANCED = r"""
root ::= pair*
pair ::= "(" root ")" | "[" root "]"
"""


def _balanced(text: str) -> bool:
    stack = []
    for c in text:
        if c in "([":
            stack.append(c)
        elif not stack or stack.pop() != {")": "(", "]": "["}[c]:
            return False
    return not stack


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet="()[]", max_size=14))
def test_recursive_grammar_against_a_bracket_counter(text: str) -> None:
    assert compile_grammar(BALANCED).matches(text) == _balanced(text)


@pytest.mark.parametrize(("gbnf", "regex"), [
    ('root ::= [a-c]+ ("x" | "yz"){1,3}', r"[a-c]+(x|yz){1,3}"),
    ('root ::= "ab"* [^a-z]? .', r"(ab)*[^a-z]?[\s\S]"),
    ('root ::= word ("," word){0,2}\nword ::= [a-b]{2,}', r"[a-b]{2,}(,[a-b]{2,}){0,2}"),
    ('root ::= "\\x41\\u00e9\\U0001F600" [\\[\\]]', "Aé😀[\\[\\]]"),
    ('root ::= ( # a comment\n  "a" |\n  "b"\n) "c"?  # trailing\n', "(a|b)c?"),
])
def test_regular_grammars_equal_their_regex(gbnf: str, regex: str) -> None:
    g = compile_grammar(gbnf)
    alphabet = sorted(set(regex) | set("abcxyz,Aé😀[]\n"))

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.from_regex(regex, fullmatch=True), st.text(st.sampled_from(alphabet), max_size=10)))
    def check(text: str) -> None:
        assert g.matches(text) == (re.fullmatch(regex, text) is not None), text

    check()


@pytest.mark.parametrize(("gbnf", "message"), [
    ('item ::= "a"', "no 'root' rule"),
    ("root ::= item", "undefined rule 'item'"),
    ('root ::= "a"\nroot ::= "b"', "line 2, column 1: rule 'root' is defined twice"),
    ('root ::= root "a" | "b"', "left-recursive"),
    ('root ::= x\nx ::= y? root "a" | "b"\ny ::= "c"', "left-recursive"),
    ('root ::= "a', "unterminated literal"),
    ('root ::= [a-', "unterminated character class"),
    ('root ::= [z-a]', "reversed"),
    ('root ::= ("a"', "expecting ')'"),
    ('root ::= * "a"', "nothing before it"),
    ('root ::= "a"{3,1}', "max below min"),
    ('root ::= "a"{x}', "expecting an integer"),
    ('root ::= "\\q"', "unknown escape"),
    ("root = 'a'", "expecting '::='"),
    ("root ::= <think> .*", "token references"),
    ('root ::= "a" )', "unexpected ')'"),
    ('root ::= x\nx ::= "a" x', "no string"),
])
def test_errors(gbnf: str, message: str) -> None:
    with pytest.raises(SchemaError) as info:
        compile_grammar(gbnf)
    assert message in str(info.value), str(info.value)


def test_right_recursion_keeps_state_small() -> None:
    """`x*` and right-recursive rules reuse their frame: the state after 1000 items is the state after 1."""
    g = compile_grammar('root ::= item*\nitem ::= "a" | "b" item')
    one = g.step(g.initial(), ord("a"))
    assert g.step_bytes(g.initial(), b"a" * 1000) == one
    assert g.forced_bytes(g.step_bytes(g.initial(), b"bbb")) == b""
