"""JSON Schema → grammar: the JSON texts a schema accepts, spelled the way a model should write them.

The translation follows llama.cpp's json-schema-to-grammar and outlines: objects list their properties in the
schema's order (required ones always, optional ones present or absent, each in its place), whitespace between
tokens is a bounded run (see `json_text.WS`), numbers with bounds are exact digit-range languages
(`numeric.py`), string formats are regexes (`json_text.FORMATS`), `pattern` goes through the regex compiler
(searched, not anchored, as JSON Schema means it) and `enum`/`const` are the literal encodings of their values.
`$ref` becomes a rule reference, so a recursive schema is a recursive grammar run by the pushdown runtime
instead of an unrolled DFA.

Supported keywords: type (all seven, and lists), enum, const, properties, required, additionalProperties
(true/false/schema), minLength, maxLength, pattern, format (date, time, date-time, uuid, email, uri), minimum,
maximum, exclusiveMinimum, exclusiveMaximum, items, prefixItems, minItems, maxItems, anyOf, oneOf, allOf, $ref
(local: `#`, `#/$defs/x`, `#/definitions/x`, any pointer), $defs/definitions, uniqueItems: false, and
annotations (title, description, default, examples, ...; `x-*` extensions are ignored). Anything else is a
`SchemaError` naming its place, e.g. `properties.age.multipleOf: unsupported keyword`.

Choices where generation and the letter of JSON Schema differ (all make the generated language a subset of the
valid documents, so generated output always validates, except for oneOf's exclusivity):
- property order is fixed to the schema's, and keys are written without escapes;
- `additionalProperties` absent on an object *with* `properties` means no other properties (as in llama.cpp:
  a model should not invent keys); write `additionalProperties: true` to allow them. Without `properties`
  any object is allowed. Additional properties come after the declared ones;
- `oneOf` is compiled as `anyOf`; `matches` checks exclusivity with the validator;
- one of `pattern` / `format` / `minLength`+`maxLength` per string (their intersection is not built);
- `allOf` is merged keyword by keyword (`json_allof.py`); two different `pattern`s, `format`s, `const`s or
  `additionalProperties` in one `allOf` are unsupported.

A schema (or a required part of it) that no value satisfies is a compile-time `SchemaError`: `minimum >
maximum`, `minItems > maxItems`, an empty `enum`, a required property forbidden by `additionalProperties:
false`, a pattern with an empty language, and, through the automaton's pruning, anything subtler.

`matches(text)` is lenient where generation is strict: it parses the text with `json.loads` (any whitespace),
validates the value, and runs the automaton over its canonical spelling (`json_text.canonical_json`), so it
accepts exactly the valid documents whose object keys follow the schema's order.
"""

from __future__ import annotations

import json
from decimal import Decimal
from math import ceil, floor
from typing import Any

from nbllm.constrain.automaton import Automaton, content_key, deep_recursion
from nbllm.constrain.errors import SchemaError, Unsatisfiable
from nbllm.constrain.ir import EMPTY, Node, Ref, Repeat, alt, literal, optional, seq
from nbllm.constrain.json_allof import TYPES, merge_all
from nbllm.constrain.json_text import (
    FORMATS,
    INTEGER,
    NUMBER,
    STRING,
    STRING_CHAR,
    WS,
    as_decimal,
    canonical_json,
    json_chars,
    quoted,
    string_except,
)
from nbllm.constrain.json_validate import json_equal, pattern_automaton, ref_path, resolve_ref, validate
from nbllm.constrain.numeric import number_range
from nbllm.constrain.regex import parse_regex

_ANNOTATIONS = frozenset({"$schema", "$id", "$anchor", "$comment", "$defs", "definitions", "title", "description",
                          "default", "examples", "deprecated", "readOnly", "writeOnly", "contentEncoding",
                          "contentMediaType"})


def _is_schema(v: Any) -> bool:
    return isinstance(v, (dict, bool))


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _is_json(v: Any) -> bool:
    try:
        canonical_json(v)
    except (ValueError, RecursionError):
        return False
    return True


# keyword → (check of its value, what the check wants)
_KEYWORDS: dict[str, tuple[Any, str]] = {
    "type": (lambda v: v in TYPES or (isinstance(v, list) and v and all(t in TYPES for t in v)),
             f"one of {', '.join(TYPES)} or a non-empty list of them"),
    "enum": (lambda v: isinstance(v, list) and all(_is_json(e) for e in v), "a list of JSON values"),
    "const": (_is_json, "a JSON value"),
    "properties": (lambda v: isinstance(v, dict) and all(_is_schema(s) for s in v.values()),
                   "an object of schemas"),
    "required": (lambda v: isinstance(v, list) and all(isinstance(n, str) for n in v), "a list of names"),
    "additionalProperties": (_is_schema, "a schema or a boolean"),
    "minLength": (_is_count, "a non-negative integer"),
    "maxLength": (_is_count, "a non-negative integer"),
    "minItems": (_is_count, "a non-negative integer"),
    "maxItems": (_is_count, "a non-negative integer"),
    "pattern": (lambda v: isinstance(v, str), "a regex string"),
    "format": (lambda v: isinstance(v, str), "a format name"),
    "minimum": (_is_number, "a number"),
    "maximum": (_is_number, "a number"),
    "exclusiveMinimum": (_is_number, "a number (the draft-4 boolean form is not supported)"),
    "exclusiveMaximum": (_is_number, "a number (the draft-4 boolean form is not supported)"),
    "items": (_is_schema, "a schema (for the draft-7 array form use prefixItems)"),
    "prefixItems": (lambda v: isinstance(v, list) and all(_is_schema(s) for s in v), "a list of schemas"),
    "anyOf": (lambda v: isinstance(v, list) and v and all(_is_schema(s) for s in v), "a non-empty list of schemas"),
    "oneOf": (lambda v: isinstance(v, list) and v and all(_is_schema(s) for s in v), "a non-empty list of schemas"),
    "allOf": (lambda v: isinstance(v, list) and v and all(_is_schema(s) for s in v), "a non-empty list of schemas"),
    "$ref": (lambda v: isinstance(v, str), "a reference string"),
    "uniqueItems": (lambda v: v is False, "false (uniqueItems: true is not supported)"),
}
_COMMA = seq(WS, literal(","), WS)
_COLON = seq(WS, literal(":"), WS)


def compile_json_schema(schema: dict | bool | str) -> JsonSchemaGrammar:
    """A grammar for the JSON texts `schema` accepts (a dict, a boolean schema, or the schema as JSON text)."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except ValueError as e:
            raise SchemaError(f"json schema: not valid JSON ({e})") from None
    with deep_recursion("json schema"):
        compiler = _Compiler(schema)
        key = content_key("json_schema", json.dumps(schema, ensure_ascii=False))
        return JsonSchemaGrammar(schema, compiler.rules, key)


class JsonSchemaGrammar(Automaton):
    """The automaton of a schema, with the lenient `matches` described in the module docstring."""

    def __init__(self, schema: Any, rules: dict[str, Node], key: str) -> None:
        super().__init__(rules, "root", key=key, what="json schema")
        self.schema = schema

    def matches(self, text: str) -> bool:
        try:
            value = json.loads(text, parse_constant=_reject_constant)
            canonical = canonical_json(value)
        except (ValueError, RecursionError):
            return False
        return validate(self.schema, value, self.schema) and super().matches(canonical)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _loc(path: str) -> str:
    return path or "(root)"


class _Compiler:
    """Walks the schema once, building IR; `$ref` targets become rules named by their reference."""

    def __init__(self, root: Any) -> None:
        self.root = root
        self.rules: dict[str, Node] = {}
        self.ref_errors: dict[str, SchemaError] = {}
        self.rules["root"] = self.schema(root, "")

    def schema(self, s: Any, path: str) -> Node:
        if s is True:
            return self.any_value()
        if s is False:
            raise Unsatisfiable(f"{_loc(path)}: the schema is false, so no value satisfies it")
        s = _constraints(s, path)
        if "$ref" in s:
            if len(s) == 1:
                return self.ref(s["$ref"], path)
            rest = {k: v for k, v in s.items() if k != "$ref"}
            return self.schema({"allOf": [{"$ref": s["$ref"]}, rest]}, path)
        if "allOf" in s:
            return self.schema(self.merge(s, path), path)
        for key in ("anyOf", "oneOf"):
            if key in s:
                rest = {k: v for k, v in s.items() if k != key}
                return self.any_of([{"allOf": [rest, b]} if rest else b for b in s[key]], _join(path, key))
        if "enum" in s or "const" in s:
            return self.enum(s, path)
        types = s.get("type", list(TYPES))
        types = [types] if isinstance(types, str) else types
        if "number" in types:
            types = [t for t in types if t != "integer"]
        return self.any_of(types, path, typed=s)

    def any_of(self, options: list, path: str, typed: dict | None = None) -> Node:
        """Alternatives that survive (schemas, or type names of the schema `typed`); fails if none does."""
        nodes, first_error = [], None
        for i, option in enumerate(options):
            try:
                nodes.append(self.typed(typed, option, path) if typed is not None
                             else self.schema(option, f"{path}.{i}"))
            except Unsatisfiable as e:
                first_error = first_error or e
        if not nodes:
            raise first_error  # type: ignore[misc]
        return alt(*nodes)

    def typed(self, s: dict, name: str, path: str) -> Node:
        if name == "null":
            return literal("null")
        if name == "boolean":
            return alt(literal("true"), literal("false"))
        if name in ("integer", "number"):
            return self.number(s, path, integer=name == "integer")
        return {"string": self.string, "array": self.array, "object": self.object}[name](s, path)

    def any_value(self) -> Node:
        """Any JSON value (the schema `true`): a recursive rule built once."""
        if "json_value" not in self.rules:
            value = Ref("json_value")
            member = seq(STRING, _COLON, value)
            self.rules["json_value"] = alt(
                literal("null"), literal("true"), literal("false"), NUMBER, STRING,
                seq(literal("{"), WS, optional(seq(member, Repeat(seq(_COMMA, member), 0, None))), WS, literal("}")),
                seq(literal("["), WS, optional(seq(value, Repeat(seq(_COMMA, value), 0, None))), WS, literal("]")))
        return Ref("json_value")

    def ref(self, ref: str, path: str) -> Node:
        if ref in self.ref_errors:
            raise self.ref_errors[ref]
        if ref not in self.rules:
            target = resolve_ref(self.root, ref, _join(path, "$ref"))
            self.rules[ref] = alt()  # a placeholder that recursive references inside the target point at
            try:
                self.rules[ref] = self.schema(target, ref_path(ref))
            except Unsatisfiable as e:
                self.ref_errors[ref] = e
                raise
        return Ref(ref)

    def merge(self, s: dict, path: str) -> dict:
        """allOf (with any `$ref` among its branches) folded into one schema."""
        parts: list[tuple[dict, str]] = []

        def collect(x: Any, where: str, seen: frozenset[str]) -> None:
            if x is True:
                return
            if x is False:
                raise Unsatisfiable(f"{where}: the schema is false, so no value satisfies it")
            x = dict(_constraints(x, where))
            if "$ref" in x:
                ref = x.pop("$ref")
                if ref in seen:
                    raise SchemaError(f"{where}.$ref: {ref!r} includes itself through allOf")
                collect(resolve_ref(self.root, ref, _join(where, "$ref")), ref_path(ref), seen | {ref})
            for i, sub in enumerate(x.pop("allOf", [])):
                collect(sub, f"{_join(where, 'allOf')}.{i}", seen)
            parts.append((x, where))

        collect(s, path, frozenset())
        return merge_all(parts)

    def enum(self, s: dict, path: str) -> Node:
        key = "enum" if "enum" in s else "const"
        values = s["enum"] if "enum" in s else [s["const"]]
        if "enum" in s and "const" in s:
            values = [v for v in values if json_equal(v, s["const"])]
        rest = {k: v for k, v in s.items() if k not in ("enum", "const")}
        kept = [v for v in values if validate(rest, v, self.root)]
        if not kept:
            raise Unsatisfiable(f"{_join(path, key)}: no listed value satisfies the schema")
        return alt(*(literal(canonical_json(v)) for v in kept))

    def number(self, s: dict, path: str, integer: bool) -> Node:
        lo, lo_strict, lo_key = _bound(s, "minimum", "exclusiveMinimum", max)
        hi, hi_strict, _ = _bound(s, "maximum", "exclusiveMaximum", min)
        if lo is None and hi is None:
            return INTEGER if integer else NUMBER
        if lo is not None and hi is not None:
            if lo > hi or (lo == hi and (lo_strict or hi_strict)):
                raise Unsatisfiable(f"{_join(path, lo_key)}: no number is within [{lo}, {hi}] "
                                     "(mind exclusive bounds)")
            first = lo + 1 if lo_strict and lo == int(lo) else Decimal(ceil(lo))
            last = hi - 1 if hi_strict and hi == int(hi) else Decimal(floor(hi))
            if integer and first > last:
                raise Unsatisfiable(f"{_join(path, lo_key)}: no integer is within the bounds {lo}..{hi}")
        return number_range(lo, lo_strict, hi, hi_strict, integer)

    def string(self, s: dict, path: str) -> Node:
        used = [k for k in ("pattern", "format") if k in s]
        used += ["minLength/maxLength"] if "minLength" in s or "maxLength" in s else []
        if len(used) > 1:
            raise SchemaError(f"{_loc(path)}: {' together with '.join(used)} on one string is not supported")
        if "pattern" in s:
            where = _join(path, "pattern")
            pattern_automaton(s["pattern"], where)  # syntax and emptiness errors, named by place
            return quoted(parse_regex(s["pattern"], json_chars, where=where, search=True))
        if "format" in s:
            if s["format"] not in FORMATS:
                raise SchemaError(f"{_join(path, 'format')}: unsupported format {s['format']!r} "
                                  f"(supported: {', '.join(FORMATS)})")
            return quoted(parse_regex(FORMATS[s["format"]], json_chars, where=s["format"], search=False))
        lo, hi = s.get("minLength", 0), s.get("maxLength")
        if hi is not None and lo > hi:
            raise Unsatisfiable(f"{_join(path, 'minLength')}: {lo} is more than maxLength {hi}")
        return STRING if (lo, hi) == (0, None) else quoted(Repeat(STRING_CHAR, lo, hi))

    def array(self, s: dict, path: str) -> Node:
        lo, hi = s.get("minItems", 0), s.get("maxItems")
        if hi is not None and lo > hi:
            raise Unsatisfiable(f"{_join(path, 'minItems')}: {lo} is more than maxItems {hi}")
        prefix = []
        for i, sub in enumerate(s.get("prefixItems", [])):
            try:
                prefix.append(self.schema(sub, f"{_join(path, 'prefixItems')}.{i}"))
            except Unsatisfiable:
                if lo > i:
                    raise
                hi = i  # arrays must end before the impossible item
                break
        rest = None
        if "items" not in s or s["items"] is not False:
            try:
                rest = self.schema(s.get("items", True), _join(path, "items"))
            except Unsatisfiable:
                if lo > len(prefix):
                    raise
        if rest is None and lo > len(prefix):
            raise Unsatisfiable(f"{_join(path, 'minItems')}: {lo} items needed but only {len(prefix)} allowed")

        def part(i: int) -> Node:  # the items after the first i
            if hi is not None and i >= hi:
                return EMPTY
            sep = _COMMA if i else EMPTY
            if i < len(prefix):
                more = seq(sep, prefix[i], part(i + 1))
                return more if i < lo else alt(EMPTY, more)
            if rest is None:
                return EMPTY
            need, cap = max(0, lo - i), None if hi is None else hi - i
            if i:
                return Repeat(seq(_COMMA, rest), need, cap)
            first = seq(rest, Repeat(seq(_COMMA, rest), max(need - 1, 0), None if cap is None else cap - 1))
            return first if need else optional(first)

        return seq(literal("["), WS, part(0), WS, literal("]"))

    def object(self, s: dict, path: str) -> Node:
        properties, required = s.get("properties", {}), s.get("required", [])
        declared_extra = s.get("additionalProperties")
        extra = declared_extra if "additionalProperties" in s else "properties" not in s
        members: list[tuple[Node, bool]] = []
        names = list(dict.fromkeys([*properties, *required]))
        for name in names:
            if name in properties:
                sub = properties[name]
            elif declared_extra is False:
                raise Unsatisfiable(f"{_join(path, 'required')}: {name!r} is required but additionalProperties "
                                     "is false and it is not among the properties")
            else:
                sub = True if declared_extra is None else declared_extra
            try:
                node = self.schema(sub, _join(path, f"properties.{name}"))
            except Unsatisfiable:
                if name in required:
                    raise
                continue
            members.append((seq(literal(canonical_json(name)), _COLON, node), name in required))
        extra_member = None
        if extra is not False:
            try:
                value = self.schema(extra, _join(path, "additionalProperties"))
                extra_member = seq(quoted(string_except(names)) if names else STRING, _COLON, value)
            except Unsatisfiable:
                pass
        return seq(literal("{"), WS, _members(members, extra_member), WS, literal("}"))


def _members(members: list[tuple[Node, bool]], extra: Node | None) -> Node:
    """Comma-separated members in order: every required one, any subset of the optional ones, then any number
    of additional ones. Built from the end: `after` follows a member already written, `start` begins the list."""
    if extra is None:
        after = start = EMPTY
    else:
        after = Repeat(seq(_COMMA, extra), 0, None)
        start = optional(seq(extra, after))
    for member, required in reversed(members):
        written, first = seq(_COMMA, member, after), seq(member, after)
        after, start = (written, first) if required else (alt(written, after), alt(first, start))
    return start


def _constraints(s: Any, path: str) -> dict:
    """The schema's constraint keywords, after checking every keyword is known and well-formed."""
    if not isinstance(s, dict):
        raise SchemaError(f"{_loc(path)}: a schema must be an object or a boolean, got {type(s).__name__}")
    out = {}
    for key, value in s.items():
        if key in _ANNOTATIONS or (isinstance(key, str) and key.startswith("x-")):
            continue
        if key not in _KEYWORDS:
            raise SchemaError(f"{_join(path, str(key))}: unsupported keyword")
        check, wanted = _KEYWORDS[key]
        if not check(value):
            raise SchemaError(f"{_join(path, key)}: expected {wanted}, got {value!r}")
        if key != "uniqueItems":
            out[key] = value
    return out


def _bound(s: dict, inclusive: str, exclusive: str, pick: Any) -> tuple[Decimal | None, bool, str]:
    """The tighter of an inclusive and an exclusive bound: (value, strict, keyword)."""
    options = [(as_decimal(s[k]), k == exclusive, k) for k in (inclusive, exclusive) if k in s]
    if not options:
        return None, False, inclusive
    best = pick(options, key=lambda o: o[0])
    ties = [o for o in options if o[0] == best[0]]
    return best[0], any(o[1] for o in ties), best[2]
