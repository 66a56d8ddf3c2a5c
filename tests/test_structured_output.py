"""Constrained generation end to end on the default model: every finished output is valid, always.

The always-valid test batches the whole schema suite (`constrain_schemas.py`) with regexes and GBNF grammars in
one `generate` call, greedy and sampled. A request that ends by itself ("stop") must parse and validate; one cut
by `max_tokens` must say "length" (its text is a prefix, never reported as valid).
"""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
from constrain_schemas import SCHEMAS

from nbllm import LLM, SamplingParams
from nbllm.constrain import SchemaError

# Generation fixes what the letter of JSON Schema leaves open (json_schema.py's docstring); oneOf is generated
# as anyOf, so an overlapping oneOf may yield a value both branches accept: not an always-valid case.
JSON_CASES = [c for c in SCHEMAS if c.name != "oneOf overlapping"]

REGEXES = [
    r"\(\d{3}\) \d{3}-\d{4}",
    r"\d{4}-(0[1-9]|1[0-2])-(0[1-9]|[12]\d|3[01])",
    r"#[0-9a-f]{6}",
    r"(yes|no|maybe)",
    r"[A-Z][a-z]{1,10} [A-Z][a-z]{1,10}",
    r"-?\d{1,4}\.\d{2}",
    r"((25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(25[0-5]|2[0-4]\d|1?\d?\d)",
    r"[a-z]+@[a-z]+\.(com|org)",
    r"[α-ω]{2,5}!",
]

GRAMMARS = [
    # Recursive arithmetic.
    ('root ::= expr\nexpr ::= term (("+" | "-") term)*\nterm ::= factor (("*" | "/") factor)*\n'
     'factor ::= [0-9]{1,3} | "(" expr ")"\n'),
    # A bulleted list of one to three short lowercase items.
    'root ::= item{1,3}\nitem ::= "- " [a-z ]{1,20} "\\n"\n',
    # A yes/no answer with a reason.
    'root ::= ("Yes" | "No") ", because " [a-z ,]{3,40} "."\n',
]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(device="cpu")


def _chat(instruction: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": instruction}]


def _check_json(case, text: str) -> None:
    value = json.loads(text)
    validator = jsonschema.Draft202012Validator(case.schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER)
    errors = [e.message for e in validator.iter_errors(value)]
    assert not errors, f"{case.name}: {text!r}: {errors}"


@pytest.mark.slow
@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_every_finished_output_is_valid(llm: LLM, temperature: float) -> None:
    from nbllm.constrain import compile_grammar

    conversations, params, checks = [], [], []
    for i, case in enumerate(JSON_CASES):
        conversations.append(_chat(f"Answer with JSON that fits this schema: {json.dumps(case.schema)}"))
        params.append(SamplingParams(max_tokens=64, temperature=temperature, seed=i, json_schema=case.schema))
        checks.append((case.name, lambda text, case=case: _check_json(case, text)))
    for i, pattern in enumerate(REGEXES):
        conversations.append(_chat(f"Write one example of text matching the regular expression {pattern}"))
        params.append(SamplingParams(max_tokens=32, temperature=temperature, seed=100 + i, regex=pattern))
        checks.append((pattern, lambda text, pattern=pattern: _assert(re.fullmatch(pattern, text), pattern, text)))
    for i, gbnf in enumerate(GRAMMARS):
        grammar = compile_grammar(gbnf)
        conversations.append(_chat("Write a short answer."))
        params.append(SamplingParams(max_tokens=48, temperature=temperature, seed=200 + i, grammar=gbnf))
        checks.append((gbnf, lambda text, grammar=grammar, gbnf=gbnf: _assert(grammar.matches(text), gbnf, text)))
    assert len(JSON_CASES) >= 30

    outputs = llm.generate([llm.chat_prompt_ids(c) for c in conversations], params)

    finished = 0
    for (name, check), out, p in zip(checks, outputs, params):
        c = out.outputs[0]
        assert c.finish_reason in ("stop", "length"), (name, c.finish_reason, c.stop_reason)
        if c.finish_reason == "stop":
            finished += 1
            check(c.text)
        else:
            assert len(c.token_ids) == p.max_tokens
    # A 270M model greedily writing an unbounded number or string may run to max_tokens; most outputs end.
    assert finished >= 0.5 * len(outputs), f"only {finished} of {len(outputs)} outputs finished"
    stats = llm.stats()
    assert stats["constrained_tokens"] > 0 and stats["jump_forward_tokens"] > 0


def _assert(ok: object, what: str, text: str) -> None:
    assert ok, f"{what}: {text!r}"


def test_constrained_and_free_requests_share_a_step(llm: LLM) -> None:
    free = SamplingParams(max_tokens=12, temperature=0)
    constrained = SamplingParams(max_tokens=24, temperature=0, regex=r"\d{3}-\d{4}")
    prompts = ["The capital of France is", "My phone number is"]
    together = llm.generate(prompts, [free, constrained])
    alone = [llm.generate(prompts[0], free)[0], llm.generate(prompts[1], constrained)[0]]
    for a, b in zip(together, alone):  # greedy output does not depend on the batch, masks included
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
    assert re.fullmatch(r"\d{3}-\d{4}", together[1].outputs[0].text)
    assert together[1].outputs[0].finish_reason == "stop"


def test_choices_return_one_of_them(llm: LLM) -> None:
    choices = ["positive", "negative", "neutral"]
    prompt = llm.chat_prompt_ids(_chat("Is the sentiment of 'I love this film' positive, negative or neutral?"))
    (greedy,) = llm.generate([prompt], SamplingParams(temperature=0, choices=choices))
    (sampled,) = llm.generate([prompt], SamplingParams(temperature=1.0, n=4, seed=3, choices=choices))
    for c in [*greedy.outputs, *sampled.outputs]:
        assert c.text in choices and c.finish_reason == "stop"


def test_cut_by_max_tokens_is_length_with_partial_text(llm: LLM) -> None:
    schema = {"type": "object", "properties": {"story": {"type": "string", "minLength": 200}}, "required": ["story"]}
    (out,) = llm.generate("Tell me a story as JSON:", SamplingParams(max_tokens=6, temperature=0, json_schema=schema))
    c = out.outputs[0]
    assert c.finish_reason == "length" and len(c.token_ids) == 6
    assert c.text.startswith('{') and not _parses(c.text)


def _parses(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def test_bad_schema_fails_before_any_work(llm: LLM) -> None:
    steps = llm.stats()["steps"]
    bad = SamplingParams(json_schema={"type": "integer", "minimum": 5, "maximum": 1})
    with pytest.raises(SchemaError):
        llm.generate(["a", "b"], [SamplingParams(max_tokens=2), bad])
    assert llm.stats()["steps"] == steps and not llm.engine.requests and llm.stats()["running"] == 0


def test_constrained_requests_take_no_speculative_drafts() -> None:
    """Drafts would skip the grammar's masks: constrained sequences decode plainly beside drafting ones."""
    llm = LLM(device="cpu", speculative_tokens=3, kv_cache_tokens=2048)
    prompt = "one two three four, one two three four, one two three four, one two"
    free, constrained = llm.generate([prompt, prompt], [
        SamplingParams(max_tokens=12, temperature=0),
        SamplingParams(max_tokens=32, temperature=0, regex=r"( (one|two|three|four),?){2,8}"),
    ])
    assert llm.stats()["spec_proposed"] > 0
    assert constrained.outputs[0].finish_reason == "stop"
    assert re.fullmatch(r"( (one|two|three|four),?){2,8}", constrained.outputs[0].text)
    assert len(free.outputs[0].token_ids) == 12
