"""The magics in a real IPython shell on a tiny model: flags, {names}, -o, chat turns hitting the cache,
reports, and bad input that ends as one line with the session still working."""

from __future__ import annotations

import pytest
from IPython import get_ipython
from IPython.core.error import UsageError
from IPython.testing.globalipapp import start_ipython

from nbllm.notebook.magics import interpolate

from engine_helpers import interrupt_at_step


@pytest.fixture(scope="module")
def ip(tiny_model):
    path, _ = tiny_model("llama", "f32")
    shell = start_ipython() or get_ipython()  # None when another test module started it first
    shell.run_line_magic("load_ext", "nbllm")
    shell.run_line_magic("llm_model", f"{path} --device cpu")
    return shell


def session(ip):
    return ip.magics_manager.registry["NbllmMagics"].session


def test_output_variable_and_interpolation(ip, capsys) -> None:
    ip.user_ns["topic"] = "the sea"
    ip.run_cell_magic("llm", "-o answer --max-tokens 6", "A poem about {topic} in {{braces}}:")
    assert isinstance(ip.user_ns["answer"], str) and ip.user_ns["answer"]
    out = capsys.readouterr().out
    assert "prompt tokens" in out and "finish: length" in out
    assert interpolate("{topic} {{x}}", {"topic": "sea"}) == "sea {x}"


def test_n_samples_store_a_list(ip) -> None:
    ip.run_cell_magic("llm", "--n 3 --temperature 1.0 --seed 7 --max-tokens 5 -o samples", "Once")
    samples = ip.user_ns["samples"]
    assert isinstance(samples, list) and len(samples) == 3


def test_chat_turns_reuse_the_cache(ip) -> None:
    s = session(ip)
    s.reset()
    ip.run_cell_magic("llm", "--chat --max-tokens 8 --system 'Be brief.'", "first question " * 8)
    ip.run_cell_magic("llm", "--chat --max-tokens 8", "second question")
    assert [m["role"] for m in s.history] == ["system", "user", "assistant", "user", "assistant"]
    stats = s.llm.stats()
    assert stats["cached_prompt_tokens"] >= 16  # the second turn's prompt starts with the first turn


def test_bad_input_is_one_line_and_the_session_survives(ip, capsys) -> None:
    with pytest.raises(UsageError, match="unrecognized arguments: --bogus"):
        ip.run_cell_magic("llm", "--bogus", "x")
    ip.run_cell_magic("llm", "", "{not_defined_anywhere}")
    err = capsys.readouterr().err
    assert "nbllm: {not_defined_anywhere} is not defined" in err and "Traceback" not in err
    ip.run_cell_magic("llm", "--max-tokens 0", "x")
    assert "max_tokens" in capsys.readouterr().err
    ip.run_cell_magic("llm", "-o still --max-tokens 3", "ok")
    assert ip.user_ns["still"]
    engine = session(ip).llm.engine
    assert not engine.requests and not engine.scheduler.running


def test_interrupt_mid_stream_frees_blocks(ip, capsys) -> None:
    engine = session(ip).llm.engine
    with interrupt_at_step(engine, 3):
        ip.run_cell_magic("llm", "--max-tokens 50", "a long answer please")
    assert "interrupted" in capsys.readouterr().err
    assert not engine.requests and not engine.scheduler.running
    assert engine.blocks.num_used_blocks == engine.radix.cached_blocks()


def test_stats_and_cache_reports(ip, capsys) -> None:
    ip.run_line_magic("llm_stats", "")
    ip.run_line_magic("llm_cache", "")
    out = capsys.readouterr().out
    assert "generated_tokens" in out and "KV blocks:" in out
    ip.run_line_magic("llm_reset", "")
    assert session(ip).llm.engine.blocks.num_used_blocks == 0
