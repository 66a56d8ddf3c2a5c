"""Chat templates: the GGUF's `tokenizer.chat_template` rendered the way HF transformers renders it, safely.

A chat template is Jinja code shipped inside a model file, so it is untrusted. It runs in Jinja's
`ImmutableSandboxedEnvironment` (no attribute escapes such as `''.__class__`, no mutation of inputs), and the
work it may do is bounded, because the sandbox alone lets a template loop forever or build a gigabyte string:

* every `{% for %}` iteration is charged to a per-render budget (the template is parsed, its loops wrapped
  in a counter, then compiled), so nested loops cannot multiply into billions of steps;
* `range` is capped by the sandbox, and arithmetic, `~` concatenation, calls and filters refuse results or
  integer arguments beyond a size limit before allocating them;
* the rendered output is streamed and cut off at a length limit.

Helpers and options follow transformers' `render_jinja_template`: `trim_blocks`, `lstrip_blocks`,
`loopcontrols`, a `tojson` that keeps non-ASCII text, `raise_exception`, `strftime_now`, the
`{% generation %}` tag, and `bos_token`/`eos_token`/`messages`/`tools`/`add_generation_prompt` variables.
Render results are meant to be encoded with `add_special_tokens=False`: templates emit BOS themselves.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer

from nbllm.errors import ChatTemplateError

MAX_LOOP_ITERATIONS = 500_000  # all {% for %} iterations of one render together
MAX_VALUE_LEN = 16_000_000  # longest string/list any single operation may produce
MAX_OUTPUT_CHARS = 16_000_000  # longest rendered prompt
MAX_POWER_BITS = 1 << 16  # `a ** b` may not produce an integer wider than this
_HUGE_NUMBER = re.compile(r"\d{8}")  # in a format string: a width/precision of 10 million or more

# Used when a model ships no template: plain "Role: content" paragraphs, ending with "Assistant:" when a
# reply is wanted, and BOS first if the vocabulary asks for one.
FALLBACK_TEMPLATE = (
    "{% if add_bos %}{{ bos_token }}{% endif %}"
    "{% for message in messages %}{{ message['role'] | capitalize }}: {{ message['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)

# Gemma's published turn format (google/gemma-3-*-it), for Gemma GGUFs that ship without a template.
GEMMA_TEMPLATE = (
    "{{ bos_token }}"
    "{%- if messages[0]['role'] == 'system' -%}"
    "{%- if messages[0]['content'] is string -%}{%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}"
    "{%- else -%}{%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}{%- endif -%}"
    "{%- set loop_messages = messages[1:] -%}"
    "{%- else -%}{%- set first_user_prefix = '' -%}{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{%- endif -%}"
    "{%- if message['role'] == 'assistant' -%}{%- set role = 'model' -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}"
    "{{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else '') }}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- elif message['content'] is iterable -%}{%- for item in message['content'] -%}"
    "{%- if item['type'] == 'image' -%}{{ '<start_of_image>' }}{%- elif item['type'] == 'text' -%}{{ item['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- else -%}{{ raise_exception('Invalid content type') }}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)
# ChatML (Qwen, many fine-tunes), for vocabularies with <|im_start|>/<|im_end|> but no template.
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def builtin_template(has_token: Callable[[str], bool]) -> str:
    """The template for a model that ships none, chosen by the turn markers its vocabulary has."""
    if has_token("<start_of_turn>") and has_token("<end_of_turn>"):
        return GEMMA_TEMPLATE
    if has_token("<|im_start|>") and has_token("<|im_end|>"):
        return CHATML_TEMPLATE
    return FALLBACK_TEMPLATE


_iterations_left: ContextVar[int] = ContextVar("nbllm_template_iterations")


class ChatTemplate:
    """One compiled chat template; `render` turns a conversation into the prompt text."""

    def __init__(self, source: str | None, *, bos_token: str = "", eos_token: str = "", add_bos: bool = False) -> None:
        self.source = source if source else FALLBACK_TEMPLATE
        self.is_fallback = not source
        self._defaults = {"bos_token": bos_token, "eos_token": eos_token, "add_bos": add_bos}
        try:
            self._template = _compile(self.source)
        except jinja2.TemplateSyntaxError as exc:
            raise ChatTemplateError(f"the chat template does not parse: {exc.message} (line {exc.lineno}); pass a valid template") from None

    def render(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        tools: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> str:
        """The prompt for `messages` (dicts with "role" and "content"); extra kwargs reach the template."""
        _check_messages(messages)
        variables = {**self._defaults, **kwargs, "messages": list(messages), "tools": tools,
                     "add_generation_prompt": add_generation_prompt}
        token = _iterations_left.set(MAX_LOOP_ITERATIONS)
        try:
            parts, size = [], 0
            for chunk in self._template.generate(**variables):
                size += len(chunk)
                if size > MAX_OUTPUT_CHARS:
                    raise ChatTemplateError(f"the chat template produced more than {MAX_OUTPUT_CHARS:,} characters; it is runaway or hostile")
                parts.append(chunk)
            return "".join(parts)
        except ChatTemplateError:
            raise
        except jinja2.exceptions.SecurityError as exc:
            raise ChatTemplateError(f"the chat template tried something unsafe ({exc}); use a trusted template") from None
        except Exception as exc:  # noqa: BLE001 (anything a template raises must become one clear error)
            raise ChatTemplateError(f"the chat template failed to render: {type(exc).__name__}: {exc}") from None
        finally:
            _iterations_left.reset(token)


def _check_messages(messages: Any) -> None:
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError("messages must be a list of {'role': ..., 'content': ...} dicts")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping) or not isinstance(message.get("role"), str):
            raise ChatTemplateError(f"message {i} is not a dict with a string 'role'; pass {{'role': 'user', 'content': '...'}}")


# -- the bounded environment ----------------------------------------------------------------------------


def _size_checked(value: Any) -> Any:
    if isinstance(value, (str, list, tuple, dict)) and len(value) > MAX_VALUE_LEN:
        raise ChatTemplateError(f"the chat template built a value longer than {MAX_VALUE_LEN:,}; it is runaway or hostile")
    return value


def _check_int_args(args: Sequence[Any]) -> None:
    """Integer arguments size what calls like `center(n)` or `ljust(n)` allocate: refuse absurd ones upfront."""
    for arg in args:
        if isinstance(arg, int) and abs(arg) > MAX_VALUE_LEN:
            raise ChatTemplateError(f"the chat template passed {arg} to a function; arguments above {MAX_VALUE_LEN:,} are refused")


def _check_format_string(fmt: Any) -> None:
    """A width or precision in a format string sizes its output: refuse 8+ digit numbers in one upfront."""
    if isinstance(fmt, str) and _HUGE_NUMBER.search(fmt):
        raise ChatTemplateError("the chat template formats with an absurd width or precision; it is runaway or hostile")


class _BoundedEnvironment(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset({"+", "*", "**", "%"})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        if operator == "*":
            for seq, n in ((left, right), (right, left)):
                if isinstance(seq, (str, list, tuple)) and isinstance(n, int) and len(seq) * n > MAX_VALUE_LEN:
                    raise ChatTemplateError("the chat template repeats a sequence beyond the size limit; it is runaway or hostile")
        if operator == "%":
            _check_format_string(left)
        power = operator == "**" and isinstance(left, int) and isinstance(right, int)
        if power and max(left.bit_length(), 1) * right > MAX_POWER_BITS:
            raise ChatTemplateError("the chat template computes an absurdly large power; it is runaway or hostile")
        return _size_checked(super().call_binop(context, operator, left, right))

    def call(self, context: Any, obj: Any, /, *args: Any, **kwargs: Any) -> Any:
        _check_int_args([*args, *kwargs.values()])
        return _size_checked(super().call(context, obj, *args, **kwargs))

    def wrap_str_format(self, value: Any) -> Any:
        wrapped = super().wrap_str_format(value)
        if wrapped is not None:  # `value` is some string's bound .format / .format_map
            _check_format_string(value.__self__)
        return wrapped


def _bounded_filter(func: Any) -> Any:
    """Wrap a filter so its parameters and result obey the size limits (the filtered value itself may be big)."""

    @functools.wraps(func)  # keeps Jinja's pass_context / pass_environment markers
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _check_int_args([*args[1:], *kwargs.values()])
        if func.__name__ == "do_format":
            _check_format_string(args[0] if args else None)
        return _size_checked(func(*args, **kwargs))

    return wrapper


def _counted(iterable: Any) -> Any:
    """Charge each loop iteration to the render's budget."""
    for item in iterable:
        left = _iterations_left.get() - 1
        if left < 0:
            raise ChatTemplateError(f"the chat template ran more than {MAX_LOOP_ITERATIONS:,} loop iterations; it is runaway or hostile")
        _iterations_left.set(left)
        yield item


def _concat(*parts: Any) -> str:
    return _size_checked("".join(str(p) for p in parts))


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False) -> str:
    """transformers' `tojson`: plain `json.dumps` (Jinja's own escapes <, >, & for HTML, which prompts must not)."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(f"the chat template rejected the conversation: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(Extension):
    """transformers' `{% generation %}...{% endgeneration %}` (marks assistant text for training masks): renders its body."""

    tags = frozenset({"generation"})

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


@functools.cache
def _environment() -> _BoundedEnvironment:
    env = _BoundedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _GenerationTag])
    env.filters = {name: _bounded_filter(f) for name, f in env.filters.items()}
    env.filters["tojson"] = _bounded_filter(_tojson)
    env.globals.pop("lipsum", None)  # generates text from a size argument and is useless in prompts
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now,
                       __nbllm_counted=_counted, __nbllm_concat=_concat)
    return env


class _Guards(NodeTransformer):
    """Routes every loop through the iteration budget and every `~` through the size check."""

    def visit_For(self, node: nodes.For) -> nodes.For:
        self.generic_visit(node)
        node.iter = nodes.Call(nodes.Name("__nbllm_counted", "load"), [node.iter], [], None, None, lineno=node.lineno)
        return node

    def visit_Concat(self, node: nodes.Concat) -> nodes.Call:
        self.generic_visit(node)
        return nodes.Call(nodes.Name("__nbllm_concat", "load"), node.nodes, [], None, None, lineno=node.lineno)


def _compile(source: str) -> jinja2.Template:
    env = _environment()
    return env.from_string(_Guards().visit(env.parse(source)))
