"""Chat templates render as HF transformers renders them, and hostile templates fail fast and clearly."""

import time

import pytest

from nbllm.errors import ChatTemplateError
from nbllm.tokenizer import ChatTemplate
from nbllm.tokenizer.chat_template import (
    CHATML_TEMPLATE,
    FALLBACK_TEMPLATE,
    GEMMA_TEMPLATE,
    builtin_template,
)

LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
QWEN2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# exercises the helpers real templates use: tools, tojson (non-ASCII kept), loop controls, namespace, blocks
TOOLY = """{%- set ns = namespace(n=0) -%}
{%- if tools %}Tools: {{ tools | tojson(indent=2) }}
{% endif %}
{%- for m in messages %}
  {%- if m['role'] == 'system' %}{% continue %}{% endif %}
  {%- set ns.n = ns.n + 1 %}
{{ ns.n }}. {{ m['role'] }}: {{ m['content'] | tojson }}
{% endfor %}
{%- if add_generation_prompt %}assistant:{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": " Hi <b>é</b> 🦙 "},
     {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "2+2?"}],
]
TOOLS = [{"type": "function", "function": {"name": "météo", "parameters": {"type": "object", "properties": {}}}}]


@pytest.fixture(scope="module")
def hf_render():
    utils = pytest.importorskip("transformers.utils.chat_template_utils")

    def render(source, messages, add_generation_prompt, tools=None):
        rendered, _ = utils.render_jinja_template(
            conversations=[messages], chat_template=source, tools=tools, add_generation_prompt=add_generation_prompt,
            bos_token="<bos>", eos_token="<eos>",
        )
        return rendered[0]

    return render


@pytest.mark.parametrize("source", [GEMMA_TEMPLATE, LLAMA3, QWEN2, CHATML_TEMPLATE, TOOLY], ids=["gemma", "llama3", "qwen2", "chatml", "tooly"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_like_transformers(hf_render, source, add_generation_prompt):
    template = ChatTemplate(source, bos_token="<bos>", eos_token="<eos>")
    for messages in CONVERSATIONS:
        for tools in (None, TOOLS):
            ours = template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools)
            assert ours == hf_render(source, messages, add_generation_prompt, tools)


def test_gemma_template_output():
    prompt = ChatTemplate(GEMMA_TEMPLATE, bos_token="<bos>").render(CONVERSATIONS[1])
    assert prompt == (
        "<bos><start_of_turn>user\nBe brief.\n\nHi <b>é</b> 🦙<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n"
        "<start_of_turn>user\n2+2?<end_of_turn>\n<start_of_turn>model\n"
    )
    with pytest.raises(ChatTemplateError, match="roles must alternate"):
        ChatTemplate(GEMMA_TEMPLATE).render([{"role": "assistant", "content": "x"}])


def test_builtin_template_follows_the_vocabulary():
    assert builtin_template(lambda t: t in {"<start_of_turn>", "<end_of_turn>"}) is GEMMA_TEMPLATE
    assert builtin_template(lambda t: t in {"<|im_start|>", "<|im_end|>"}) is CHATML_TEMPLATE
    assert builtin_template(lambda t: False) is FALLBACK_TEMPLATE
    fallback = ChatTemplate(None, bos_token="<s>", add_bos=True)
    assert fallback.is_fallback
    assert fallback.render(CONVERSATIONS[0]) == "<s>User: Hi\n\nAssistant:"


def test_strftime_now_and_extra_variables():
    out = ChatTemplate("{{ strftime_now('%Y') }}|{{ enable_thinking }}").render([], enable_thinking=True)
    assert out == f"{time.strftime('%Y')}|True"


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("{{ ''.__class__.__mro__ }}", "unsafe"),
        ("{{ messages.append(1) }}", "unsafe"),
        ("{% for i in range(10**9) %}x{% endfor %}", "refused"),
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "loop iterations"),
        ("{% set x = range(90000)|list %}{% for a in x %}{% for b in x %}{% endfor %}{% endfor %}", "loop iterations"),
        ("{{ 'a' * 10**9 }}", "size limit"),
        ("{{ 2 ** (10**9) }}", "large power"),
        ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}", "longer than"),
        ("{% set ns = namespace(s='ab') %}{% for i in range(40) %}{% set ns.s = ns.s|replace('a', 'aa') %}{% endfor %}", "longer than"),
        ("{{ 'x'.ljust(10**10) }}", "refused"),
        ("{{ '{:>10000000000}'.format(1) }}", "width"),
        ("{{ '%10000000000d' % 1 }}", "width"),
        ("{% for i in range(99999) %}{{ 'x' * 1000 }}{% endfor %}", "characters"),
        ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "RecursionError"),
        ("{{ raise_exception('no system role') }}", "rejected the conversation: no system role"),
        ("{% for %}", "does not parse"),
    ],
)
def test_hostile_or_broken_templates_fail_fast(source, message):
    start = time.perf_counter()
    with pytest.raises(ChatTemplateError, match=message):
        ChatTemplate(source).render(CONVERSATIONS[0])
    assert time.perf_counter() - start < 5


@pytest.mark.parametrize("messages", ["hi", [{"content": "no role"}], [["user", "hi"]]])
def test_malformed_messages_are_rejected(messages):
    with pytest.raises(ChatTemplateError, match="role"):
        ChatTemplate(QWEN2).render(messages)
