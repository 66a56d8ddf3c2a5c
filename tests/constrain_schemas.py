"""A suite of JSON Schemas with hand-written valid and invalid instances.

Shared by the constraint compiler's tests (`test_constrain_json_schema.py`: `matches` against `jsonschema`) and
the end-to-end test that generates with a real model under each schema and validates the output with
`jsonschema`. Valid instances list object keys in the schema's property order (the order generation uses).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class SchemaCase:
    name: str
    schema: Any
    valid: list[Any] = field(default_factory=list)
    invalid: list[Any] = field(default_factory=list)


_PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 30},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"},
    },
    "required": ["name", "age"],
}

SCHEMAS: list[SchemaCase] = [
    SchemaCase("null", {"type": "null"}, [None], [0, "", False]),
    SchemaCase("boolean", {"type": "boolean"}, [True, False], [0, "true", None]),
    SchemaCase("integer", {"type": "integer"}, [0, -7, 12345678901234567890], [1.5, "1", True]),
    SchemaCase("number", {"type": "number"}, [0, -1.5, 3.25e-7, 1e300], ["1", None]),
    SchemaCase("string", {"type": "string"}, ["", "héllo \"quoted\" \\ \n\t", "😀"], [1, None]),
    SchemaCase("type list", {"type": ["string", "null"]}, ["a", None], [1, []]),
    SchemaCase("age range", {"type": "integer", "minimum": 0, "maximum": 150}, [0, 42, 150], [-1, 151, 1000]),
    SchemaCase("exclusive integer", {"type": "integer", "exclusiveMinimum": -10, "exclusiveMaximum": 10},
               [-9, 0, 9], [-10, 10, 11]),
    SchemaCase("number range", {"type": "number", "minimum": -2.5, "maximum": 99.75},
               [-2.5, 0, 0.001, 99.75, 99.7], [-2.51, 99.76, 100]),
    SchemaCase("probability", {"type": "number", "minimum": 0, "exclusiveMaximum": 1}, [0, 0.5, 0.999999],
               [1, -0.1, 2]),
    SchemaCase("lower bound only", {"type": "number", "exclusiveMinimum": 0.5}, [0.5000001, 1, 1000.25], [0.5, 0, -3]),
    SchemaCase("string length", {"type": "string", "minLength": 2, "maxLength": 5}, ["ab", "abcde", "éé"],
               ["a", "abcdef", ""]),
    SchemaCase("pattern anchored", {"type": "string", "pattern": "^[A-Z]{2}-\\d{3,4}$"}, ["AB-123", "XY-9999"],
               ["ab-123", "AB-12", "AB-12345"]),
    SchemaCase("pattern unanchored", {"type": "string", "pattern": "cat|dog"}, ["a cat", "dogma", "cat"],
               ["bird", ""]),
    SchemaCase("pattern with quote", {"type": "string", "pattern": "^\"[a-z]+\"$"}, ['"ab"'], ["ab", '"AB"']),
    SchemaCase("date", {"type": "string", "format": "date"}, ["2024-02-29", "1999-12-31"],
               ["2023-02-29", "2024-13-01", "24-01-01", "0000-01-01"]),
    SchemaCase("time", {"type": "string", "format": "time"}, ["23:59:59Z", "08:00:00.5+02:00"],
               ["24:00:00Z", "08:00", "08:00:00"]),
    SchemaCase("date-time", {"type": "string", "format": "date-time"}, ["2024-05-01T12:30:00Z",
                                                                        "2024-05-01T12:30:00.123-07:00"],
               ["2024-05-01 12:30:00Z", "2024-05-01T25:00:00Z"]),
    SchemaCase("uuid", {"type": "string", "format": "uuid"}, ["123e4567-e89b-12d3-a456-426614174000"],
               ["123e4567e89b12d3a456426614174000", "xyz"]),
    SchemaCase("email", {"type": "string", "format": "email"}, ["a.b+c@example.co.uk"], ["plainaddress"]),
    SchemaCase("uri", {"type": "string", "format": "uri"}, ["https://example.com/a?b=c#d", "urn:isbn:0451450523"],
               ["not a uri", "//example.com"]),
    SchemaCase("enum", {"enum": ["red", "green", 3, None, {"a": [1, 2]}]}, ["red", 3, 3.0, None, {"a": [1, 2]}],
               ["blue", 4, {"a": [1]}, True]),
    SchemaCase("const", {"const": {"kind": "circle", "r": 1}}, [{"kind": "circle", "r": 1}],
               [{"kind": "circle", "r": 2}, "circle"]),
    SchemaCase("typed enum", {"type": "string", "enum": ["a", 1, "b"]}, ["a", "b"], [1, "c"]),
    SchemaCase("person", _PERSON, [{"name": "Ada", "age": 36}, {"name": "Bo", "age": 7, "email": "bo@x.io"}],
               [{"name": "Ada"}, {"name": "", "age": 1}, {"name": "Ada", "age": 200}, {"name": "A", "age": 1.5}]),
    SchemaCase("nested objects", {
        "type": "object",
        "properties": {
            "id": {"type": "integer", "minimum": 1},
            "address": {"type": "object", "properties": {
                "street": {"type": "string"}, "zip": {"type": "string", "pattern": "^\\d{5}$"}},
                "required": ["street", "zip"], "additionalProperties": False},
        },
        "required": ["id", "address"],
    }, [{"id": 1, "address": {"street": "Main", "zip": "12345"}}],
        [{"id": 0, "address": {"street": "Main", "zip": "12345"}}, {"id": 1, "address": {"street": "Main"}},
         {"id": 1, "address": {"street": "Main", "zip": "1234a"}}]),
    SchemaCase("all optional", {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "boolean"},
                                                                  "c": {"type": "null"}}},
               [{}, {"a": 1}, {"b": True}, {"a": 1, "c": None}, {"a": 1, "b": False, "c": None}],
               [{"a": "x"}, {"b": None}]),
    SchemaCase("additional schema", {"type": "object", "properties": {"id": {"type": "integer"}},
                                     "required": ["id"], "additionalProperties": {"type": "number"}},
               [{"id": 1}, {"id": 1, "x": 2.5, "y": -1}], [{"id": 1, "x": "s"}, {"x": 1}]),
    SchemaCase("free object", {"type": "object"}, [{}, {"a": [1, {"b": None}], "c": "d"}], [[], "x"]),
    SchemaCase("array bounds", {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9},
                                "minItems": 1, "maxItems": 4}, [[0], [1, 2, 3, 9]], [[], [1, 2, 3, 4, 5], [10]]),
    SchemaCase("tuple", {"type": "array", "prefixItems": [{"type": "string"}, {"type": "integer"}],
                         "items": False, "minItems": 2}, [["a", 1]], [["a"], ["a", 1, 2], [1, "a"]]),
    SchemaCase("tuple then rest", {"type": "array", "prefixItems": [{"const": "head"}], "items": {"type": "boolean"}},
               [[], ["head"], ["head", True, False]], [["tail"], ["head", 1]]),
    SchemaCase("anyOf", {"anyOf": [{"type": "string", "maxLength": 3}, {"type": "integer", "minimum": 10}]},
               ["abc", 10, 99], ["abcd", 9, None]),
    SchemaCase("oneOf overlapping", {"oneOf": [{"type": "integer", "maximum": 10}, {"type": "integer", "minimum": 5}]},
               [1, 11], [7, "x"]),
    SchemaCase("allOf", {"allOf": [
        {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
        {"properties": {"a": {"minimum": 5}, "b": {"type": "string"}}},
    ]}, [{"a": 5}, {"a": 9, "b": "x"}], [{"a": 4}, {"b": "x"}]),
    SchemaCase("linked list", {
        "$defs": {"node": {"type": "object", "properties": {
            "value": {"type": "integer"}, "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}},
            "required": ["value", "next"], "additionalProperties": False}},
        "$ref": "#/$defs/node",
    }, [{"value": 1, "next": None}, {"value": 1, "next": {"value": 2, "next": {"value": 3, "next": None}}}],
        [{"value": 1}, {"value": 1, "next": {"value": "x", "next": None}}]),
    SchemaCase("tree", {
        "definitions": {"tree": {"type": "object", "properties": {
            "label": {"type": "string", "maxLength": 8},
            "children": {"type": "array", "items": {"$ref": "#/definitions/tree"}, "maxItems": 3}},
            "required": ["label"]}},
        "$ref": "#/definitions/tree",
    }, [{"label": "root", "children": [{"label": "a"}, {"label": "b", "children": [{"label": "c"}]}]}],
        [{"label": "root", "children": [{"name": "a"}]}, {"label": "way too long"}]),
    SchemaCase("recursive root", {"type": "array", "items": {"anyOf": [{"type": "integer"}, {"$ref": "#"}]}},
               [[], [1, [2, [3]], []]], [[1, "a"], [[None]]]),
    SchemaCase("tool call", {
        "type": "object",
        "properties": {
            "tool": {"enum": ["search", "calculator"]},
            "arguments": {"anyOf": [
                {"type": "object", "properties": {"query": {"type": "string"}}, "required": ["query"]},
                {"type": "object", "properties": {"expression": {"type": "string"}}, "required": ["expression"]},
            ]},
        },
        "required": ["tool", "arguments"],
        "additionalProperties": False,
    }, [{"tool": "search", "arguments": {"query": "nbllm"}},
        {"tool": "calculator", "arguments": {"expression": "1+1"}}],
        [{"tool": "shell", "arguments": {"query": "x"}}, {"tool": "search", "arguments": {}}]),
    SchemaCase("true schema", True, [None, 1, "x", [1, {"a": []}]], []),
]
