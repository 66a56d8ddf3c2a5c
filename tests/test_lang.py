"""`nbllm.lang` against references: a program's text equals the direct `llm.generate` calls it stands for (greedy),
fork branches and `run_batch` programs share engine steps, `select` picks what an independent forward (the HF
model the tiny GGUF was written from) scores best, constrained gens match, errors are clear `NbllmError`s."""

from __future__ import annotations

import json
import re

import pytest
import torch
from engine_helpers import assert_no_leak, interrupt_at_step, make_llm
from tiny_models import hf_logits

from nbllm import NbllmError, SamplingParams
from nbllm import lang as sgl
from nbllm.constrain import SchemaError


@pytest.fixture(scope="module")
def tiny(tiny_model):
    path, hf = tiny_model("llama", "f32")
    return make_llm(path), hf


def greedy(max_tokens: int, **kwargs) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0.0, **kwargs)


def direct(llm, text: str, params: SamplingParams) -> str:
    return llm.generate(text, params)[0].outputs[0].text


@sgl.function
def two_turns(s, topic):
    s += f"Notes on {topic}:"
    s += sgl.gen("first", max_tokens=6)
    s += "\nMore:" + sgl.gen("second", max_tokens=5, stop=["\n"])


def test_program_text_equals_direct_generate(tiny) -> None:
    llm, _ = tiny
    state = two_turns.run("owls", llm=llm, temperature=0.0)
    first = direct(llm, "Notes on owls:", greedy(6))
    second = direct(llm, "Notes on owls:" + first + "\nMore:", greedy(5, stop=["\n"]))
    assert state["first"] == first and state["second"] == second
    assert state.text() == "Notes on owls:" + first + "\nMore:" + second
    assert state.get_meta_info("first").outputs[0].text == first
    assert_no_leak(llm)


def test_run_defaults_apply_and_gen_overrides(tiny) -> None:
    llm, _ = tiny

    @sgl.function
    def prog(s):
        s += "abc" + sgl.gen("a") + sgl.gen("b", max_tokens=2)

    state = prog.run(llm=llm, temperature=0.0, max_tokens=4, ignore_eos=True)
    assert len(state.get_meta_info("a").outputs[0].token_ids) == 4
    assert len(state.get_meta_info("b").outputs[0].token_ids) == 2


@sgl.function
def fork_two(s, short, long):
    s += "Shared context for both branches."
    forks = s.fork(2)
    for f, n in zip(forks, (short, long)):
        f += " Branch:" + sgl.gen("out", max_tokens=n, ignore_eos=True)
    forks.join()


@sgl.function
def one_branch(s, n):
    s += "Shared context for both branches. Branch:" + sgl.gen("out", max_tokens=n, ignore_eos=True)


def steps_of(llm, fn) -> int:
    before = llm.stats()["steps"]
    fn()
    return llm.stats()["steps"] - before


def test_fork_branches_run_as_one_batch(tiny) -> None:
    llm, _ = tiny
    alone = [steps_of(llm, lambda n=n: one_branch.run(n, llm=llm, temperature=0.0)) for n in (5, 9)]
    state = None

    def run_fork() -> None:
        nonlocal state
        state = fork_two.run(5, 9, llm=llm, temperature=0.0)

    together = steps_of(llm, run_fork)
    assert alone == [5, 9]  # one prefill step that also yields the first token, then one step per token
    assert together == max(alone) < sum(alone)
    text = "Shared context for both branches. Branch:"
    assert state["out"] == [direct(llm, text, greedy(5, ignore_eos=True)), direct(llm, text, greedy(9, ignore_eos=True))]
    assert [out.outputs[0].text for out in state.get_meta_info("out")] == state["out"]  # join gathers meta too
    assert_no_leak(llm)


def test_fork_group_broadcast_and_branch_reads(tiny) -> None:
    llm, _ = tiny

    @sgl.function
    def prog(s):
        s += "Root."
        forks = s.fork(3)
        forks += " Same for all:"
        for i, f in enumerate(forks):
            f += f" {i}" + sgl.gen("x", max_tokens=3)
        s += " After:" + forks[1]["x"]  # reading a branch waits for it
        forks.join()

    state = prog.run(llm=llm, temperature=0.0)
    xs = [direct(llm, f"Root. Same for all: {i}", greedy(3)) for i in range(3)]
    assert state["x"] == xs
    assert state.text() == "Root. After:" + xs[1]


def test_run_batch_keeps_order_and_shares_steps(tiny) -> None:
    llm, _ = tiny
    lengths = [3, 7, 5, 2]
    alone = max(steps_of(llm, lambda n=n: one_branch.run(n, llm=llm, temperature=0.0)) for n in lengths)
    states = []
    together = steps_of(llm, lambda: states.extend(
        one_branch.run_batch([{"n": n} for n in lengths], llm=llm, temperature=0.0)))
    assert together == alone
    assert [len(s.get_meta_info("out").outputs[0].token_ids) for s in states] == lengths
    text = "Shared context for both branches. Branch:"
    assert [s["out"] for s in states] == [direct(llm, text, greedy(n, ignore_eos=True)) for n in lengths]
    assert_no_leak(llm)


def reference_choice_scores(llm, hf, text: str, choices: list[str]) -> list[float]:
    """Mean log-probability of each choice's tokens, from the HF model's full-sequence logits."""
    prefix = llm.tokenizer.encode(text)
    scores = []
    for choice in choices:
        ids = llm.tokenizer.encode(text + choice)
        start = next(i for i in range(len(ids)) if i >= len(prefix) or ids[i] != prefix[i])
        logprobs = torch.log_softmax(hf_logits(hf, ids), dim=-1)
        scores.append(sum(logprobs[i - 1, ids[i]].item() for i in range(start, len(ids))) / (len(ids) - start))
    return scores


@pytest.mark.parametrize("choices", [["yes", "no"], ["red", "green", "blue", "a much longer answer"],
                                     [" x", "x", "xx"]])
def test_select_picks_the_reference_best(tiny, choices) -> None:
    llm, hf = tiny

    @sgl.function
    def prog(s):
        s += "Question: pick one. Answer:"
        s += sgl.select("pick", choices)
        s += " then" + sgl.gen("after", choices=choices)  # gen(choices=...) is a select, as in SGLang

    state = prog.run(llm=llm)
    for name, text in (("pick", "Question: pick one. Answer:"),
                       ("after", "Question: pick one. Answer:" + state["pick"] + " then")):
        expected = reference_choice_scores(llm, hf, text, choices)
        got = state.get_meta_info(name)
        assert list(got) == choices
        assert list(got.values()) == pytest.approx(expected, abs=1e-4)
        assert state[name] == choices[max(range(len(choices)), key=expected.__getitem__)]
    assert state.text().endswith(state["pick"] + " then" + state["after"])


def test_constrained_gens_match(tiny) -> None:
    llm, _ = tiny
    schema = {"type": "object", "properties": {"n": {"type": "integer"}, "ok": {"type": "boolean"}},
              "required": ["n", "ok"], "additionalProperties": False}

    @sgl.function
    def prog(s):
        s += "Code:" + sgl.gen("code", regex=r"[0-9]{3}-[a-z]{2}")
        s += "\nJSON:" + sgl.gen("obj", json_schema=schema, max_tokens=40)

    state = prog.run(llm=llm, temperature=0.0)
    assert re.fullmatch(r"[0-9]{3}-[a-z]{2}", state["code"])
    value = json.loads(state["obj"])
    assert set(value) == {"n", "ok"} and isinstance(value["n"], int) and isinstance(value["ok"], bool)
    assert state["code"] == direct(llm, "Code:", greedy(128, regex=r"[0-9]{3}-[a-z]{2}"))


def test_roles_write_what_chat_sends(tiny) -> None:
    """The tiny vocabulary has no turn markers, so the fallback "Role: content" template applies (a template
    with a system turn of its own; Gemma's folded system turn is checked on the default model)."""
    llm, _ = tiny

    @sgl.function
    def chat(s):
        s += sgl.system("Be brief.")
        s += sgl.user("Hello " + "there")
        s += sgl.assistant(sgl.gen("reply", max_tokens=6))
        s += sgl.user("Again?")
        s += sgl.assistant(sgl.gen("again", max_tokens=4))

    state = chat.run(llm=llm, temperature=0.0)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    (first,) = llm.chat(messages, greedy(6))
    assert state["reply"] == first.outputs[0].text
    messages += [{"role": "assistant", "content": state["reply"]}, {"role": "user", "content": "Again?"}]
    assert state.messages() == [*messages, {"role": "assistant", "content": state["again"]}]
    # The second reply continues the program's own text (which opens each reply as a generation prompt does).
    text = state.text()
    assert text.endswith(state["again"] + "\n\n")
    before = text[: len(text) - len(state["again"] + "\n\n")]
    assert before.endswith("User: Again?\n\nAssistant:")
    assert state["again"] == direct(llm, before, greedy(4))


def test_user_errors_are_clear(tiny, monkeypatch) -> None:
    llm, _ = tiny
    monkeypatch.setattr("nbllm.lang.backend._notebook_session", lambda: None)  # no notebook in reach
    with pytest.raises(sgl.GenArgumentError, match="regex and choices"):
        sgl.gen("x", regex="a+", choices=["a"])
    with pytest.raises(sgl.GenArgumentError, match="temperature"):
        sgl.gen("x", temperature=-1)
    with pytest.raises(sgl.GenArgumentError, match="non-empty list"):
        sgl.select("x", [])

    @sgl.function
    def reads_unknown(s):
        s += "hi" + sgl.gen("answer", max_tokens=2)
        s["answr"]

    with pytest.raises(sgl.UnknownVariableError, match="no variable 'answr'.*'answer'") as info:
        reads_unknown.run(llm=llm)
    assert isinstance(info.value, NbllmError)

    @sgl.function
    def bad_schema(s):
        s += "x" + sgl.gen("v", json_schema={"type": "no-such-type"})

    with pytest.raises(SchemaError):
        bad_schema.run(llm=llm)
    with pytest.raises(sgl.ProgramArgumentError, match="two_turns"):
        two_turns.run(llm=llm, subject="owls")
    with pytest.raises(sgl.ProgramArgumentError, match="unknown keywords"):
        two_turns.run_batch([{"topic": "owls"}], llm=llm, tempreature=0)
    with pytest.raises(sgl.NoBackendError, match="set_default_backend"):
        two_turns.run("owls")
    assert_no_leak(llm)


def test_default_backend(tiny) -> None:
    llm, _ = tiny
    sgl.set_default_backend(llm)
    try:
        state = two_turns.run("owls", temperature=0.0)
    finally:
        sgl.set_default_backend(None)
    assert state["first"] == direct(llm, "Notes on owls:", greedy(6))


def test_notebook_session_is_the_fallback_backend(tiny_model) -> None:
    from IPython import get_ipython
    from IPython.testing.globalipapp import start_ipython

    path, _ = tiny_model("llama", "f32")
    shell = start_ipython() or get_ipython()  # None when another test module started it first
    shell.run_line_magic("load_ext", "nbllm")
    shell.run_line_magic("llm_model", f"{path} --device cpu")
    session_llm = shell.magics_manager.registry["NbllmMagics"].session.llm
    state = two_turns.run("owls", temperature=0.0)
    assert state["first"] == direct(session_llm, "Notes on owls:", greedy(6))


def test_error_in_one_branch_stops_the_run_cleanly(tiny) -> None:
    llm, _ = tiny

    @sgl.function
    def prog(s):
        forks = s.fork(2)
        forks[0] += "fine" + sgl.gen("a", max_tokens=50, ignore_eos=True)
        forks[1] += "x" * 10_000 + sgl.gen("b")  # longer than the tiny model's context
        forks.join()

    with pytest.raises(NbllmError, match="context"):
        prog.run(llm=llm, temperature=0.0)
    assert_no_leak(llm)


def test_a_program_that_raises_leaves_no_branch_running(tiny) -> None:
    llm, _ = tiny

    @sgl.function
    def prog(s):
        forks = s.fork(2)
        forks[0] += "x" + sgl.gen("a", max_tokens=2, ignore_eos=True)
        forks[1] += "x" + sgl.gen("a", max_tokens=50, ignore_eos=True)
        forks[0]["a"]  # the other branch is in the engine now
        raise ValueError("boom")

    with pytest.raises(ValueError, match="boom"):
        prog.run(llm=llm, temperature=0.0)
    assert_no_leak(llm)


def test_select_on_a_text_longer_than_the_context_is_a_clear_error(tiny) -> None:
    llm, _ = tiny

    @sgl.function
    def prog(s):
        forks = s.fork(2)
        forks[0] += "short" + sgl.select("pick", ["a", "b"])
        forks[1] += "x" * 10_000 + sgl.select("pick", ["a", "b"])
        assert forks[0]["pick"] in ("a", "b")  # scored in the same step as the failing one, answered all the same
        forks.join()

    with pytest.raises(NbllmError, match="context holds"):
        prog.run(llm=llm)
    assert_no_leak(llm)


def test_interrupt_aborts_and_the_next_run_works(tiny) -> None:
    llm, _ = tiny
    with interrupt_at_step(llm.engine, 3), pytest.raises(KeyboardInterrupt):
        fork_two.run(20, 30, llm=llm, temperature=0.0)
    assert_no_leak(llm)
    state = two_turns.run("owls", llm=llm, temperature=0.0)
    assert state["first"] == direct(llm, "Notes on owls:", greedy(6))


# ---------------------------------------------------------------------- the default model


@pytest.fixture(scope="module")
def gemma(default_model_path):
    from nbllm import LLM

    return LLM(default_model_path, device="cpu")


@pytest.mark.slow
def test_default_model_program_fork_and_select(gemma) -> None:
    @sgl.function
    def quiz(s, question):
        s += f"Q: {question}\nA:" + sgl.gen("answer", max_tokens=8, stop="\n")
        s += "\nIs the answer correct? Reply yes or no:" + sgl.select("verdict", ["yes", "no"])
        forks = s.fork(2)
        for f, word in zip(forks, ("Because", "However")):
            f += f"\n{word}," + sgl.gen("why", max_tokens=6)
        forks.join()

    question = "What is the capital of France?"
    before = gemma.stats()["steps"]
    state = quiz.run(question, llm=gemma, temperature=0.0)
    steps = gemma.stats()["steps"] - before
    prompt = f"Q: {question}\nA:"
    answer = direct(gemma, prompt, greedy(8, stop="\n"))
    assert state["answer"] == answer
    text = prompt + answer + "\nIs the answer correct? Reply yes or no:"
    scores = gemma.token_logprobs(*_choice_tokens(gemma, text, ["yes", "no"]))
    means = [sum(s) / len(s) for s in scores]
    assert state["verdict"] == ["yes", "no"][means.index(max(means))]
    text += state["verdict"]
    assert state["why"] == [direct(gemma, text + f"\n{w},", greedy(6)) for w in ("Because", "However")]
    answer_steps = len(state.get_meta_info("answer").outputs[0].token_ids)
    assert steps <= answer_steps + 6  # the fork's 6 tokens cost 6 steps, not 12


def _choice_tokens(llm, text, choices):
    prefix = llm.tokenizer.encode(text)
    seqs = [llm.tokenizer.encode(text + c) for c in choices]
    starts = [next(i for i in range(len(ids)) if i >= len(prefix) or ids[i] != prefix[i]) for ids in seqs]
    return seqs, starts


@pytest.mark.slow
def test_default_model_roles_equal_chat(gemma) -> None:
    @sgl.function
    def chat(s, question):
        s += sgl.system("Answer in one short sentence.")
        s += sgl.user(question)
        s += sgl.assistant(sgl.gen("reply", max_tokens=12))

    state = chat.run("Why is the sky blue?", llm=gemma, temperature=0.0)
    messages = [{"role": "system", "content": "Answer in one short sentence."},
                {"role": "user", "content": "Why is the sky blue?"}]
    (expected,) = gemma.chat(messages, greedy(12))
    assert state["reply"] == expected.outputs[0].text
    assert state.messages() == [*messages, {"role": "assistant", "content": expected.outputs[0].text}]
