"""Constrained decoding: compile a regex, JSON Schema, GBNF grammar or choice list into a byte automaton.

Every compiler returns a `Grammar` (see `automaton.py`): a byte-level automaton with `initial`, `step`,
`accepting`, `matches`, `step_bytes`, `forced_bytes` and a content `key`; the token index turns its states into
allowed-token masks. Invalid, unsupported or unsatisfiable input raises `SchemaError` at compile time.
"""

from nbllm.constrain.automaton import Automaton, Grammar, State
from nbllm.constrain.choices import compile_choices
from nbllm.constrain.errors import SchemaError
from nbllm.constrain.gbnf import compile_grammar
from nbllm.constrain.json_schema import JsonSchemaGrammar, compile_json_schema
from nbllm.constrain.regex import compile_regex

__all__ = ["Automaton", "Grammar", "JsonSchemaGrammar", "SchemaError", "State", "compile_choices",
           "compile_grammar", "compile_json_schema", "compile_regex"]
