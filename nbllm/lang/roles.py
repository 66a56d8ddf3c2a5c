"""Chat roles through the model's own chat template: what text opens and closes a `system`/`user`/`assistant` turn.

SGLang keeps a table of role prefixes per model family. nbllm asks the template instead: render the conversation
so far, then the conversation plus the new turn with a placeholder as its content; the text between the two
renders up to the placeholder opens the turn, the text after it closes the turn. That works for any template that
renders a conversation append-only (each render starts with the previous one), and it copes with templates that
fold a system message into the first user turn (Gemma's): such a system turn adds no text of its own and shows
up inside the next turn's opening.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from nbllm.lang.errors import LangError
from nbllm.tokenizer import Tokenizer

_PLACEHOLDER = "\x00nbllm-turn-content\x00"


@dataclass
class Turn:
    """How to write one turn: `opening` before its content and `closing` after it; `folded` when the template
    puts the content inside the next turn instead (then the content must be known text)."""

    opening: str
    closing: str
    folded: bool


@dataclass
class Conversation:
    """The turns a program has written so far, in the template's terms."""

    tokenizer: Tokenizer
    messages: list[dict[str, str]] = field(default_factory=list)

    def turn(self, role: str, *, generated: bool = False) -> Turn:
        """How to write the next `role` turn. A `generated` assistant turn opens as the template's generation
        prompt does (what `llm.chat` sends) when that is where the rendered opening starts: "Assistant:" rather
        than "Assistant: ", since the model writes its own leading space."""
        base = self._render(self.messages)
        full = self._render([*self.messages, {"role": role, "content": _PLACEHOLDER}])
        if _PLACEHOLDER not in full:
            return Turn("", "", folded=True)
        head, tail = full.split(_PLACEHOLDER, 1)
        if not head.startswith(base):
            raise LangError(f"the chat template does not render turns append-only, so a {role} turn cannot be "
                            "added to the text; build the prompt with llm.chat_prompt_ids instead")
        if generated and role == "assistant":
            prompt = self._render(self.messages, add_generation_prompt=True)
            if prompt.startswith(base) and head.startswith(prompt):
                head = prompt
        return Turn(head[len(base):], tail, folded=False)

    def add(self, role: str, content: str) -> None:
        self.messages.append({"role": role, "content": content})

    def copy(self) -> Conversation:
        return Conversation(self.tokenizer, [dict(m) for m in self.messages])

    def _render(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = False) -> str:
        if not messages and not add_generation_prompt:
            return ""
        text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
        bos = self.tokenizer.bos_token
        # The engine adds BOS when it encodes the program's text; the template's own would be a second one.
        return text[len(bos):] if bos and text.startswith(bos) else text
