"""The notebook's one engine and its conversation: what `%%llm` cells share.

The model loads lazily, on the first cell that needs it, so `%load_ext nbllm` is instant. A `--chat` cell
appends to a running conversation whose rendered prompt grows turn by turn; because each turn's prompt starts
with the previous turn's prompt and answer, the radix cache serves that prefix and only the new turn is
prefilled.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from nbllm.engine.llm import LLM
from nbllm.engine.outputs import RequestOutput
from nbllm.engine.sampling_params import SamplingParams


@dataclass
class CellRequest:
    """One `%%llm` cell, after its flags were parsed and `{names}` filled in."""

    text: str
    params: SamplingParams
    chat: bool = False
    system: str | None = None


@dataclass
class Session:
    model: str | None = None
    device: str = "auto"
    n_gpu_layers: int | None = None
    history: list[dict[str, str]] = field(default_factory=list)
    decode_speeds: list[float] = field(default_factory=list)
    _llm: LLM | None = None

    @property
    def llm(self) -> LLM:
        if self._llm is None:
            self._llm = LLM(self.model, device=self.device, n_gpu_layers=self.n_gpu_layers)
        return self._llm

    @property
    def loaded(self) -> bool:
        return self._llm is not None

    def switch_model(self, model: str | None, device: str, n_gpu_layers: int | None) -> LLM:
        """Load another model now (the old one is dropped, with its caches and conversation)."""
        self._llm = None
        self.model, self.device, self.n_gpu_layers = model, device, n_gpu_layers
        self.history.clear()
        return self.llm

    def prompt_ids(self, cell: CellRequest) -> list[int]:
        llm = self.llm
        if not cell.chat and cell.system is None:
            return llm.tokenizer.encode(cell.text)
        messages = list(self.history) if cell.chat else []
        if cell.system is not None and not messages:
            messages.append({"role": "system", "content": cell.system})
        messages.append({"role": "user", "content": cell.text})
        return llm.chat_prompt_ids(messages)

    def run(self, cell: CellRequest) -> Iterator[RequestOutput]:
        """Stream the cell's request; on completion a `--chat` cell's turn joins the conversation."""
        last = None
        for out in self.llm.stream([self.prompt_ids(cell)], cell.params):
            last = out
            yield out
        if last is None:
            return
        if last.metrics.decode_tok_s:
            self.decode_speeds.append(last.metrics.decode_tok_s)
        if cell.chat:
            if cell.system is not None and not self.history:
                self.history.append({"role": "system", "content": cell.system})
            self.history.append({"role": "user", "content": cell.text})
            self.history.append({"role": "assistant", "content": last.outputs[0].text})

    def reset(self) -> None:
        """Forget the conversation and clear the prefix cache (the model stays loaded)."""
        self.history.clear()
        if self._llm is not None:
            self._llm.reset_prefix_cache()


def parse_json_output(text: str) -> Any:
    """The value of a `--json` answer; text cut by max_tokens is returned as text, never as a fake value."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text
