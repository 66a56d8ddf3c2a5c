"""JSON Schema compiler against `jsonschema` (Draft 2020-12 with format checking) on the suite in
`constrain_schemas.py`: hand-written instances, and instances hypothesis draws from each schema (valid or
nearly so) in several whitespace layouts, must get the same verdict from `matches` as from `jsonschema`. The
automaton alone (what generation uses) must accept only valid documents and must accept `json.dumps` output
of valid values. Bad or unsatisfiable schemas must fail at compile time, naming the place."""

import json
import re
import time
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nbllm.constrain import SchemaError, compile_json_schema
from nbllm.constrain.json_text import FORMATS, canonical_json
from constrain_schemas import SCHEMAS, SchemaCase

_MISSING = object()
_FORMATS = jsonschema.Draft202012Validator.FORMAT_CHECKER
_FORMAT_STRATEGIES = {
    "date": st.dates().map(lambda d: d.isoformat()),
    "time": st.times().map(lambda t: t.isoformat() + "Z"),
    "date-time": st.datetimes().map(lambda d: d.isoformat() + "Z"),
    "uuid": st.uuids().map(str),
    "email": st.from_regex(FORMATS["email"], fullmatch=True),
    "uri": st.from_regex(FORMATS["uri"], fullmatch=True),
}
_SCALARS = st.none() | st.booleans() | st.integers(-1000, 1000) | st.floats(allow_nan=False, allow_infinity=False) \
    | st.text(max_size=8)
_JSON = st.recursive(_SCALARS, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4),
                                                                                          inner, max_size=3),
                     max_leaves=8)


def _ecma_pattern(validator: Any, pattern: str, instance: Any, schema: Any) -> Any:
    """`pattern` as ECMA-262 (and nbllm) read it: ASCII `\\d \\w \\s`, `$` only at the very end. jsonschema
    uses Python's defaults, where `\\d` matches any Unicode digit and `$` also matches before a final newline."""
    if isinstance(instance, str) and not re.search(re.sub(r"(?<!\\)\$", r"\\Z", pattern), instance, re.ASCII):
        yield jsonschema.ValidationError(f"{instance!r} does not match {pattern!r}")


_Validator = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"pattern": _ecma_pattern})


def _valid(case: SchemaCase, value: Any) -> bool:
    return _Validator(case.schema, format_checker=_FORMATS).is_valid(value)


def _resolve(root: Any, ref: str) -> Any:
    node = root
    for part in ref[2:].split("/") if ref != "#" else []:
        node = node[part]
    return node


def from_schema(schema: Any, root: Any, depth: int = 0) -> st.SearchStrategy:
    """Values shaped by the schema (mostly valid; near misses are fine: the tests compare verdicts)."""
    if schema is True or schema == {}:
        return _JSON
    if "$ref" in schema:
        return from_schema(_resolve(root, schema["$ref"]), root, depth + 1)
    for key in ("anyOf", "oneOf", "allOf"):
        if key in schema:
            options = schema[key] if depth < 3 else [b for b in schema[key] if "$ref" not in json.dumps(b)][-1:]
            return st.one_of(*(from_schema(b, root, depth) for b in options or schema[key][-1:]))
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if "const" in schema:
        return st.just(schema["const"])
    types = schema.get("type", ["null", "boolean", "number", "string"])
    types = [types] if isinstance(types, str) else types
    return st.one_of(*(_typed(schema, t, root, depth) for t in types))


def _typed(s: dict, t: str, root: Any, depth: int) -> st.SearchStrategy:
    if t == "null":
        return st.none()
    if t == "boolean":
        return st.booleans()
    if t in ("integer", "number"):
        lo = s.get("minimum", s.get("exclusiveMinimum"))
        hi = s.get("maximum", s.get("exclusiveMaximum"))
        ints = st.integers(None if lo is None else int(lo) - 1, None if hi is None else int(hi) + 1)
        if t == "integer":
            return ints
        floats = st.floats(None if lo is None else lo - 1, None if hi is None else hi + 1, allow_nan=False,
                           allow_infinity=False)
        return ints | floats
    if t == "string":
        if "pattern" in s:
            return st.from_regex(s["pattern"])
        if "format" in s:
            return _FORMAT_STRATEGIES[s["format"]]
        return st.text(min_size=max(0, s.get("minLength", 0) - 1), max_size=s.get("maxLength", 10) + 1)
    if t == "array":
        prefix = [from_schema(p, root, depth + 1) for p in s.get("prefixItems", [])]
        items = s.get("items", True)
        rest = st.lists(from_schema(items, root, depth + 1), max_size=0 if depth >= 3 else 4) \
            if items is not False else st.just([])
        return st.tuples(st.tuples(*prefix), rest).map(lambda pr: list(pr[0]) + pr[1])
    properties, required = s.get("properties", {}), s.get("required", [])
    if not properties:
        return st.dictionaries(st.text(max_size=5), _JSON, max_size=3)
    names = list(properties)
    parts = [from_schema(properties[n], root, depth + 1) if n in required
             else st.just(_MISSING) if depth >= 3  # deep in a recursive schema: end the recursion
             else st.just(_MISSING) | from_schema(properties[n], root, depth + 1) for n in names]
    return st.tuples(*parts).map(lambda vs: {n: v for n, v in zip(names, vs) if v is not _MISSING})


def _layouts(value: Any) -> list[str]:
    return [json.dumps(value), json.dumps(value, indent=2), json.dumps(value, separators=(",", ":")),
            json.dumps(value, indent="\t", ensure_ascii=False), " \r\n" + json.dumps(value) + "\n\t "]


def _automaton_accepts(grammar: Any, text: str) -> bool:
    state = grammar.step_bytes(grammar.initial(), text.encode("utf-8"))
    return state is not None and grammar.accepting(state)


_COMPILED = {case.name: compile_json_schema(case.schema) for case in SCHEMAS}


@pytest.mark.parametrize("case", SCHEMAS, ids=[c.name for c in SCHEMAS])
def test_hand_written_instances(case: SchemaCase) -> None:
    grammar = _COMPILED[case.name]
    for value in case.valid:
        assert _valid(case, value), f"suite error: {value!r} should be valid"
        for text in _layouts(value):
            assert grammar.matches(text), text
        assert _automaton_accepts(grammar, canonical_json(value)), value
        if not _has_literals(case.schema) and not _has_integral_float(value):
            assert _automaton_accepts(grammar, json.dumps(value)), value  # json.dumps' own spacing
    for value in case.invalid:
        assert not _valid(case, value), f"suite error: {value!r} should be invalid"
        for text in _layouts(value):
            assert not grammar.matches(text), text


@pytest.mark.parametrize("case", SCHEMAS, ids=[c.name for c in SCHEMAS])
@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_generated_instances_agree_with_jsonschema(case: SchemaCase, data: st.DataObject) -> None:
    grammar = _COMPILED[case.name]
    value = data.draw(from_schema(case.schema, case.schema) | _JSON)
    expected = _valid(case, value)
    ordered = _in_generation_order(case.schema, value)
    for text in _layouts(value):
        got = grammar.matches(text)
        # Only documented restrictions may reject a valid value: key order and undeclared keys.
        assert got == expected or (expected and not ordered), (text, got, expected)
    # The automaton alone (what generation runs) accepts only valid documents...
    if "oneOf" not in json.dumps(case.schema) and _automaton_accepts(grammar, canonical_json(value)):
        assert expected, value


def _has_literals(schema: Any) -> bool:
    """enum/const values are generated in their compact canonical spelling only."""
    text = json.dumps(schema)
    return '"enum"' in text or '"const"' in text


def _has_integral_float(value: Any) -> bool:
    """1.0 is generated as 1 (JSON Schema makes them equal)."""
    if isinstance(value, float):
        return value.is_integer()
    items = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return any(_has_integral_float(v) for v in items)


def _in_generation_order(schema: Any, value: Any) -> bool:
    """Whether the top-level object lists only declared keys, in the schema's order (values drawn from the
    schema are in order by construction; random ones may not be)."""
    if not isinstance(value, dict) or not isinstance(schema, dict) or "properties" not in schema:
        return True
    return list(value) == [k for k in schema["properties"] if k in value]


@pytest.mark.parametrize(("schema", "message"), [
    ({"type": "integer", "minimum": 5, "maximum": 1}, "minimum: no number"),
    ({"type": "object", "properties": {"age": {"type": "integer", "minimum": 10, "exclusiveMaximum": 10}},
      "required": ["age"]},
     "properties.age.minimum"),
    ({"type": "integer", "exclusiveMinimum": 1, "exclusiveMaximum": 2}, "no integer"),
    ({"properties": {"x": {"type": "integer", "multipleOf": 2}}}, "properties.x.multipleOf: unsupported keyword"),
    ({"if": {"type": "string"}, "then": {"minLength": 1}}, "if: unsupported keyword"),
    ({"patternProperties": {"^a": {}}}, "patternProperties: unsupported keyword"),
    ({"dependentSchemas": {"a": {}}}, "dependentSchemas: unsupported keyword"),
    ({"type": "array", "uniqueItems": True}, "uniqueItems"),
    ({"not": {"type": "string"}}, "not: unsupported keyword"),
    ({"enum": []}, "enum: no listed value"),
    ({"type": "string", "enum": [1, 2]}, "enum: no listed value"),
    ({"type": "object", "properties": {"a": {}}, "required": ["b"], "additionalProperties": False}, "required: 'b'"),
    ({"type": "array", "minItems": 3, "maxItems": 2}, "minItems: 3 is more than maxItems 2"),
    ({"type": "array", "prefixItems": [{}], "items": False, "minItems": 2}, "minItems: 2 items needed"),
    ({"type": "string", "minLength": 3, "maxLength": 2}, "minLength"),
    ({"properties": {"s": {"type": "string", "pattern": "[^\\x00-\\U0010ffff]"}}, "required": ["s"]},
     "properties.s.pattern: no string"),
    ({"properties": {"s": {"type": "string", "pattern": "(?=x)"}}}, "properties.s.pattern: lookaround"),
    ({"type": "string", "format": "hostname"}, "format: unsupported format"),
    ({"type": "string", "format": "date", "maxLength": 10}, "format together with minLength/maxLength"),
    ({"$ref": "#/$defs/missing"}, "$ref: the reference"),
    ({"$ref": "http://example.com/schema"}, "only local"),
    ({"type": "strnig"}, "type: expected"),
    ({"type": "integer", "minimum": "0"}, "minimum: expected a number"),
    ({"items": [{"type": "string"}]}, "items: expected a schema"),
    ({"allOf": [{"type": "string"}, {"type": "integer"}]}, "share no type"),
    ({"allOf": [{"pattern": "a"}, {"pattern": "b"}]}, "different 'pattern'"),
    ({"$defs": {"a": {"$ref": "#/$defs/b"}, "b": {"allOf": [{"$ref": "#/$defs/a"}]}}, "$ref": "#/$defs/a"},
     "includes itself"),
    ({"$defs": {"n": {"type": "object", "properties": {"n": {"$ref": "#/$defs/n"}}, "required": ["n"]}},
      "$ref": "#/$defs/n"}, "no string"),
    (False, "false"),
    ([], "must be an object"),
    ("{not json", "not valid JSON"),
])
def test_bad_schemas_fail_at_compile_time(schema: Any, message: str) -> None:
    with pytest.raises(SchemaError, match=None) as info:
        compile_json_schema(schema)
    assert message in str(info.value), str(info.value)
    assert isinstance(info.value, ValueError)


def test_optional_impossible_property_is_left_out() -> None:
    g = compile_json_schema({"type": "object", "properties": {"a": {"type": "integer", "minimum": 2, "maximum": 1},
                                                               "b": {"type": "string"}}})
    assert g.matches('{"b": "x"}') and not g.matches('{"a": 1, "b": "x"}')


def test_jump_forward_and_bounded_whitespace() -> None:
    g = compile_json_schema({"type": "object", "properties": {"answer": {"const": "yes"}}, "required": ["answer"],
                             "additionalProperties": False})
    state = g.step(g.initial(), ord("{"))
    assert g.forced_bytes(g.step(state, ord('"'))) == b'answer"'
    assert g.forced_bytes(g.step_bytes(state, b'"answer":')) == b""  # a space may follow the colon
    assert g.forced_bytes(g.step_bytes(state, b'"answer": ')) == b'"yes"'
    # Generation allows a bounded run of whitespace; matches accepts any.
    assert g.step_bytes(g.initial(), b"{" + b" " * 2) is None
    assert g.matches("{" + " " * 50 + '"answer":"yes"}')


def test_compile_time_of_the_suite() -> None:
    """Every suite schema compiles well within a second (typical: a few ms)."""
    for case in SCHEMAS:
        start = time.process_time()
        compile_json_schema(case.schema)
        assert time.process_time() - start < 1.0, case.name


def test_bounds_with_hundreds_of_digits() -> None:
    g = compile_json_schema({"type": "number", "exclusiveMinimum": 1e-300, "maximum": 1e300})
    assert g.matches("0.5") and g.matches(json.dumps(2e-300)) and g.matches(json.dumps(1e300))
    assert not g.matches("0") and not g.matches(json.dumps(1e-300)) and not g.matches(json.dumps(2e300))
