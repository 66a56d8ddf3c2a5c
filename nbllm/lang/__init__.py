"""`nbllm.lang`: SGLang's frontend language over the in-process engine.

```python
from nbllm import lang as sgl

@sgl.function
def two_facts(s, topic):
    s += f"Two facts about {topic}.\\n"
    forks = s.fork(2)                       # both branches run in the same engine steps
    for i, f in enumerate(forks):
        f += f"Fact {i + 1}:" + sgl.gen("fact", max_tokens=24, stop="\\n")
    forks.join()                            # s["fact"] is now the list of both facts

state = two_facts.run(topic="owls", llm=LLM(), temperature=0)
state["fact"], state.text()
```
Modules: `primitives` (gen, select, roles), `state` (the `s` of a program, forks), `runtime` (threads and the
engine driver that batches them), `program` (`@function`, `run`, `run_batch`), `roles` (chat turns through the
model's template), `backend` (which LLM), `errors`.
"""

from nbllm.lang.backend import set_default_backend
from nbllm.lang.errors import (
    GenArgumentError,
    LangError,
    NoBackendError,
    ProgramArgumentError,
    ProgramCancelled,
    UnknownVariableError,
)
from nbllm.lang.primitives import assistant, gen, select, system, user
from nbllm.lang.program import Program, function
from nbllm.lang.state import ForkGroup, ProgramState

__all__ = [
    "ForkGroup",
    "GenArgumentError",
    "LangError",
    "NoBackendError",
    "Program",
    "ProgramArgumentError",
    "ProgramCancelled",
    "ProgramState",
    "UnknownVariableError",
    "assistant",
    "function",
    "gen",
    "select",
    "set_default_backend",
    "system",
    "user",
]
