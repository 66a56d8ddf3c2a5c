"""A list of choices → byte automaton: the output is exactly one of the strings.

The alternatives are plain literals; the runtime's lazy subset construction shares their common prefixes (after
"New Y" the state holds only the choices that start that way), so no trie is built here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

from nbllm.constrain.automaton import Automaton, content_key
from nbllm.constrain.errors import SchemaError
from nbllm.constrain.ir import alt, literal


def compile_choices(choices: Sequence[str]) -> Automaton:
    """A grammar accepting exactly the given strings."""
    if isinstance(choices, str) or not isinstance(choices, Sequence):
        raise SchemaError(f"choices: expected a list of strings, got {type(choices).__name__}")
    if not choices:
        raise SchemaError("choices: the list is empty, so no output could satisfy it")
    for i, choice in enumerate(choices):
        if not isinstance(choice, str):
            raise SchemaError(f"choices[{i}]: expected a string, got {type(choice).__name__}")
        try:
            choice.encode("utf-8")
        except UnicodeEncodeError as e:
            raise SchemaError(f"choices[{i}]: not encodable as UTF-8 ({e.reason})") from None
    unique = sorted(set(choices))
    return Automaton({"choices": alt(*(literal(c) for c in unique))}, "choices",
                     key=content_key("choices", json.dumps(unique)), what="choices")
