"""The one error the constraint compilers raise.

A schema, pattern or grammar is user input typed into a notebook cell, so every problem with it (bad syntax, an
unsupported feature, a constraint no output can satisfy) is caught when it is compiled, never while a model is
generating, and reported in one line that starts with where the problem is (`properties.age.minimum: ...`,
`regex at 7: ...`, `gbnf line 3: ...`).
"""

from nbllm.errors import NbllmError


class SchemaError(NbllmError, ValueError):
    """An invalid, unsupported or unsatisfiable schema, regex, GBNF grammar or choice list."""


class Unsatisfiable(SchemaError):
    """A (sub)schema no value satisfies: fatal where the value is required, skipped where it is one option."""
