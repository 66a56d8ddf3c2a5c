"""`ProgramState` (the `s` of a program) and `ForkGroup` (what `s.fork(n)` returns).

A state is a stream, as in SGLang: `s += expr` queues the expression and returns at once; a worker thread of the
state runs its queue in order (text appends, generations, selections). Reading — `s["name"]`, `s.text()`,
`s.fork(n)`, `forks.join()` — waits until the queue is done. That is what lets forks run together: the program
queues a `gen` on each branch without waiting, each branch's worker asks the engine, and the runtime's driver
batches those requests into the same steps (`runtime.py`).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from typing import Any

from nbllm.lang.errors import GenArgumentError, UnknownVariableError
from nbllm.lang.primitives import Concat, Expr, Gen, Role, Select, Text, as_expr
from nbllm.lang.roles import Conversation
from nbllm.lang.runtime import Runtime, Slot


class ProgramState:
    """The text of a program so far and the values its `gen`/`select` calls stored by name."""

    def __init__(self, runtime: Runtime, defaults: dict[str, Any], *, text: str = "",
                 variables: dict[str, Any] | None = None, conversation: Conversation | None = None) -> None:
        self._runtime, self._defaults = runtime, defaults
        self._text = text
        self._variables: dict[str, Any] = dict(variables or {})
        self._meta: dict[str, Any] = {}
        self._assigned: list[str] = []  # names set by this state itself (a fork's join gathers them)
        self._conversation = conversation or Conversation(runtime.llm.tokenizer)
        self._queue: deque[Expr] = deque()
        self._worker: Slot | None = None
        self._error: BaseException | None = None
        self._forks: list[ProgramState] = []

    # ------------------------------------------------------------------ what programs write

    def __iadd__(self, expr: Expr | str) -> ProgramState:
        expr = as_expr(expr)
        with self._runtime.lock:
            if self._error is not None:
                raise self._error
            self._queue.append(expr)
            if self._worker is None:
                self._worker = self._runtime.spawn(self._drain, name="nbllm-lang-state")
        return self

    def fork(self, n: int = 2) -> ForkGroup:
        """`n` copies of this state (after its queue is done) that continue independently and run together."""
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise GenArgumentError(f"fork(n) needs an int n >= 1, got {n!r}")
        self.sync()
        branches = [ProgramState(self._runtime, self._defaults, text=self._text, variables=self._variables,
                                 conversation=self._conversation.copy()) for _ in range(n)]
        self._forks.extend(branches)
        return ForkGroup(self, branches)

    # ------------------------------------------------------------------ what programs read

    def __getitem__(self, name: str) -> Any:
        self.sync()
        if name not in self._variables:
            known = ", ".join(map(repr, self._variables)) or "none yet"
            raise UnknownVariableError(f"no variable {name!r} in this state (set: {known}); "
                                       f"write gen({name!r}) or select({name!r}, ...) before reading it")
        return self._variables[name]

    def __contains__(self, name: str) -> bool:
        self.sync()
        return name in self._variables

    def text(self) -> str:
        """Everything written so far: the program's text with the generated and selected parts."""
        self.sync()
        return self._text

    def variables(self) -> dict[str, Any]:
        self.sync()
        return dict(self._variables)

    def messages(self) -> list[dict[str, str]]:
        """The chat turns written with `system`/`user`/`assistant`, as OpenAI-style messages."""
        self.sync()
        return [dict(m) for m in self._conversation.messages]

    def get_meta_info(self, name: str) -> Any:
        """For a `gen`: its `RequestOutput` (finish reason, token ids, metrics); for a `select`: the score of each
        choice."""
        self[name]
        return self._meta[name]

    def sync(self) -> None:
        """Wait until every queued expression has run; re-raise the error one of them hit."""
        while True:
            with self._runtime.lock:
                worker = self._worker
            if worker is None:
                break
            self._runtime.wait(worker)
        if self._error is not None:
            raise self._error

    def sync_all(self) -> None:
        """`sync` this state and every fork made from it (the end of a program)."""
        self.sync()
        for branch in self._forks:
            branch.sync_all()

    def __repr__(self) -> str:
        return f"ProgramState({self._text!r})"

    # ------------------------------------------------------------------ the state's worker

    def _drain(self) -> None:
        while True:
            with self._runtime.lock:
                if not self._queue:
                    self._worker = None
                    return
                expr = self._queue.popleft()
            try:
                self._run(expr)
            except BaseException as exc:
                with self._runtime.lock:
                    self._error = exc
                    self._queue.clear()
                    self._worker = None
                return

    def _run(self, expr: Expr) -> None:
        if isinstance(expr, Text):
            self._text += expr.text
        elif isinstance(expr, Concat):
            for part in expr.parts:
                self._run(part)
        elif isinstance(expr, Gen):
            out = self._runtime.generate(self._text, expr.params(self._defaults))
            self._store(expr.name, out.outputs[0].text, out)
        elif isinstance(expr, Select):
            scores = self._runtime.score(self._text, expr.choices)
            best = max(range(len(scores)), key=scores.__getitem__)  # the first of equal scores, as argmax
            self._store(expr.name, expr.choices[best], dict(zip(expr.choices, scores)))
        elif isinstance(expr, Role):
            self._run_role(expr)
        else:
            raise GenArgumentError(f"cannot append {type(expr).__name__} to a program state")

    def _store(self, name: str | None, text: str, meta: Any) -> None:
        self._text += text
        if name is not None:
            self._variables[name] = text
            self._meta[name] = meta
            self._assigned.append(name)

    def _run_role(self, expr: Role) -> None:
        content = _plain_text(expr.body)
        turn = self._conversation.turn(expr.role, generated=content is None)
        if turn.folded:  # the template writes this content into the next turn (e.g. Gemma's system prompt)
            if content is None:
                raise GenArgumentError(f"this model's chat template folds a {expr.role} turn into the next one, "
                                       f"so its content must be plain text, not gen/select")
            self._conversation.add(expr.role, content)
            return
        self._text += turn.opening
        start = len(self._text)
        self._run(expr.body)
        self._conversation.add(expr.role, self._text[start:])
        self._text += turn.closing


class ForkGroup:
    """The branches of one `fork`: index or iterate them; `+=` appends to all; `join()` waits for them."""

    def __init__(self, parent: ProgramState, branches: list[ProgramState]) -> None:
        self._parent, self._branches = parent, branches

    def __getitem__(self, i: int) -> ProgramState:
        return self._branches[i]

    def __setitem__(self, i: int, value: ProgramState) -> None:
        """What `forks[i] += ...` does after appending: the branch stays itself."""
        if value is not self._branches[i]:
            raise GenArgumentError("fork branches cannot be replaced; append to them with forks[i] += ...")

    def __iter__(self) -> Iterator[ProgramState]:
        return iter(self._branches)

    def __len__(self) -> int:
        return len(self._branches)

    def __iadd__(self, expr: Expr | str) -> ForkGroup:
        for branch in self._branches:
            branch += expr
        return self

    def join(self) -> None:
        """Wait for every branch; each name a branch set becomes, in the parent, the list of the branches'
        values (None for a branch that did not set it) — SGLang's default `gather_variable` join. The parent's
        `get_meta_info(name)` is the list of the branches' meta info."""
        for branch in self._branches:
            branch.sync_all()
        names = dict.fromkeys(name for branch in self._branches for name in branch._assigned)
        self._parent.sync()
        for name in names:
            self._parent._variables[name] = [b._variables.get(name) for b in self._branches]
            self._parent._meta[name] = [b._meta.get(name) for b in self._branches]


def _plain_text(expr: Expr) -> str | None:
    if isinstance(expr, Text):
        return expr.text
    if isinstance(expr, Concat):
        parts = [_plain_text(p) for p in expr.parts]
        return None if any(p is None for p in parts) else "".join(parts)
    return None
