"""A small JSON Schema validator over exactly the keywords the compiler supports, and `$ref` resolution.

The grammar is exact for every supported keyword but one: `oneOf` is compiled as `anyOf` (exclusivity is not
a regular property), so `matches` also runs this validator on the parsed value. The compiler uses it too, to
keep only the `enum`/`const` values that satisfy their sibling keywords. String checks (`pattern`, `format`)
reuse the regex compiler on the decoded string, so the validator and the grammar read patterns the same way.
"""

from __future__ import annotations

from decimal import Decimal
from functools import cache, lru_cache
from typing import Any
from urllib.parse import unquote

from nbllm.constrain.automaton import Automaton
from nbllm.constrain.errors import SchemaError
from nbllm.constrain.ir import char_set
from nbllm.constrain.json_text import FORMATS, as_decimal, canonical_json
from nbllm.constrain.regex import parse_regex


def resolve_ref(root: Any, ref: str, where: str) -> Any:
    """The subschema a local reference (`#`, `#/$defs/x`, `#/definitions/x`, any JSON pointer) points at."""
    if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
        raise SchemaError(f"{where}: only local JSON-pointer references ('#', '#/...') are supported, got {ref!r}")
    node = root
    for part in ref[2:].split("/") if ref != "#" else []:
        key = unquote(part).replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and key in node:
            node = node[key]
        elif isinstance(node, list) and key.isdigit() and int(key) < len(node):
            node = node[int(key)]
        else:
            raise SchemaError(f"{where}: the reference {ref!r} points at nothing")
    return node


def ref_path(ref: str) -> str:
    """A reference as a dotted location for messages: '#/$defs/node' → '$defs.node'."""
    return ".".join(unquote(p) for p in ref[1:].split("/") if p) or "(root)"


@lru_cache(maxsize=256)
def pattern_automaton(pattern: str, where: str) -> Automaton:
    """A schema `pattern` over decoded strings (anywhere in the string, as JSON Schema reads it)."""
    return Automaton({"pattern": parse_regex(pattern, char_set, where=where, search=True)}, "pattern",
                     key=pattern, what=where)


@cache
def format_automaton(fmt: str) -> Automaton:
    return Automaton({fmt: parse_regex(FORMATS[fmt], char_set, where=fmt, search=False)}, fmt, key=fmt, what=fmt)


def json_equal(a: Any, b: Any) -> bool:
    """JSON equality: 1 == 1.0, True != 1, objects regardless of key order."""
    return canonical_json(a, sort_keys=True) == canonical_json(b, sort_keys=True)


def is_type(value: Any, name: str) -> bool:
    if name == "null":
        return value is None
    if name == "boolean":
        return isinstance(value, bool)
    if isinstance(value, bool):
        return False
    if name == "integer":
        return isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    if name == "number":
        return isinstance(value, (int, float))
    return isinstance(value, {"string": str, "array": list, "object": dict}[name])


def validate(schema: Any, value: Any, root: Any) -> bool:
    """Whether `value` satisfies `schema` (with standard JSON Schema semantics for the supported keywords)."""
    if schema is True or schema is False:
        return schema
    if "$ref" in schema and not validate(resolve_ref(root, schema["$ref"], "$ref"), value, root):
        return False
    if not all(validate(s, value, root) for s in schema.get("allOf", ())):
        return False
    if "anyOf" in schema and not any(validate(s, value, root) for s in schema["anyOf"]):
        return False
    if "oneOf" in schema and sum(validate(s, value, root) for s in schema["oneOf"]) != 1:
        return False
    if "enum" in schema and not any(json_equal(value, e) for e in schema["enum"]):
        return False
    if "const" in schema and not json_equal(value, schema["const"]):
        return False
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(is_type(value, t) for t in types):
            return False
    if is_type(value, "number"):
        return _valid_number(schema, as_decimal(value))
    if isinstance(value, str):
        return _valid_string(schema, value)
    if isinstance(value, list):
        return _valid_array(schema, value, root)
    if isinstance(value, dict):
        return _valid_object(schema, value, root)
    return True


def _valid_number(schema: dict, x: Decimal) -> bool:
    checks = (("minimum", lambda b: x >= b), ("maximum", lambda b: x <= b),
              ("exclusiveMinimum", lambda b: x > b), ("exclusiveMaximum", lambda b: x < b))
    return all(check(as_decimal(schema[k])) for k, check in checks if k in schema)


def _valid_string(schema: dict, s: str) -> bool:
    if not schema.get("minLength", 0) <= len(s) <= schema.get("maxLength", len(s)):
        return False
    if "pattern" in schema and not pattern_automaton(schema["pattern"], "pattern").matches(s):
        return False
    return "format" not in schema or format_automaton(schema["format"]).matches(s)


def _valid_array(schema: dict, items: list, root: Any) -> bool:
    if not schema.get("minItems", 0) <= len(items) <= schema.get("maxItems", len(items)):
        return False
    prefix = schema.get("prefixItems", [])
    rest = schema.get("items", True)
    return all(validate(prefix[i] if i < len(prefix) else rest, v, root) for i, v in enumerate(items))


def _valid_object(schema: dict, obj: dict, root: Any) -> bool:
    if any(name not in obj for name in schema.get("required", ())):
        return False
    properties = schema.get("properties", {})
    extra = schema.get("additionalProperties", True)
    return all(validate(properties.get(k, extra), v, root) for k, v in obj.items())
