"""allOf: several schemas folded into one, keyword by keyword.

The grammar can only follow one schema per value, so `allOf` branches (with their `$ref`s already resolved)
are merged: types intersected (integer within number), numeric and size bounds tightened, `required` and
`properties` joined (a property in two branches gets both schemas as a nested allOf), `enum`s intersected and
`anyOf`s multiplied out. Keywords whose intersection the grammar cannot build (two different `pattern`s,
`format`s, `const`s, `additionalProperties`, `oneOf`s, `prefixItems`) are an unsupported-schema error.
"""

from __future__ import annotations

from typing import Any

from nbllm.constrain.errors import SchemaError, Unsatisfiable
from nbllm.constrain.json_validate import json_equal

TYPES = ("null", "boolean", "integer", "number", "string", "array", "object")


def merge_all(parts: list[tuple[dict, str]]) -> dict:
    """One schema equivalent to all of `parts` (each a constraint dict and its location, for messages)."""
    _close_additional_properties([p for p, _ in parts])
    merged: dict = {}
    for part, where in parts:
        merged = _merge_two(merged, part, where)
    return merged


def _close_additional_properties(parts: list[dict]) -> None:
    """Within allOf, a branch's additionalProperties also governs the properties other branches declare: make
    that explicit on the branch before the branches are merged."""
    for part in parts:
        extra = part.get("additionalProperties", True)
        if extra is True:
            continue
        own = part["properties"] = dict(part.get("properties", {}))
        for other in parts:
            for name in other.get("properties", {}):
                own.setdefault(name, extra)


def _merge_two(a: dict, b: dict, where: str) -> dict:
    out = dict(a)
    for k, v in b.items():
        if k not in out:
            out[k] = v
            continue
        x = out[k]
        if k == "type":
            out[k] = _common_types(x, v, where)
        elif k in ("minimum", "exclusiveMinimum", "minLength", "minItems"):
            out[k] = max(x, v)
        elif k in ("maximum", "exclusiveMaximum", "maxLength", "maxItems"):
            out[k] = min(x, v)
        elif k == "required":
            out[k] = list(dict.fromkeys([*x, *v]))
        elif k == "properties":
            out[k] = {**x, **{n: {"allOf": [x[n], sv]} if n in x else sv for n, sv in v.items()}}
        elif k == "items":
            out[k] = {"allOf": [x, v]}
        elif k == "enum":
            out[k] = [e for e in x if any(json_equal(e, f) for f in v)]
        elif k == "anyOf":
            out[k] = [{"allOf": [p, q]} for p in x for q in v]
        elif not json_equal(x, v):
            raise SchemaError(f"{where}: allOf branches with different {k!r} cannot be combined (unsupported)")
    return out


def _common_types(x: Any, v: Any, where: str) -> list[str]:
    a = set([x] if isinstance(x, str) else x)
    b = set([v] if isinstance(v, str) else v)
    common = a & b
    if ("integer" in a and "number" in b) or ("number" in a and "integer" in b):
        common.add("integer")
    if not common:
        raise Unsatisfiable(f"{where}: allOf branches share no type")
    return [t for t in TYPES if t in common]
