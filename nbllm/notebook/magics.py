"""IPython magics: `%load_ext nbllm`, `%%llm`, `%llm_model`, `%llm_stats`, `%llm_cache`, `%llm_reset`.

A magic's job is the notebook side only: parse flags, fill `{names}` from the user's namespace, stream the
text into the cell, store `-o` results, and draw the report. Mistakes (an unknown flag, a missing name, a
bad schema, a prompt too long) end as one short red line, never a traceback wall, and the session stays usable.
"""

from __future__ import annotations

import argparse
import json
import shlex
import string
import sys
from collections.abc import Mapping
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from nbllm.errors import NbllmError
from nbllm.notebook.display import StreamView, live_dashboard, show
from nbllm.notebook.session import CellRequest, Session, parse_json_output


class _Parser(argparse.ArgumentParser):
    """argparse that reports a bad flag as IPython's one-line UsageError instead of exiting."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _cell_parser() -> _Parser:
    p = _Parser(prog="%%llm", add_help=False)
    p.add_argument("-o", "--output", metavar="NAME")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--n", type=int, default=1)
    p.add_argument("--json", metavar="NAME_OR_JSON")
    p.add_argument("--regex")
    p.add_argument("--choices")
    p.add_argument("--system")
    p.add_argument("--chat", action="store_true")
    p.add_argument("--no-stream", action="store_true")
    return p


def _model_parser() -> _Parser:
    p = _Parser(prog="%llm_model", add_help=False)
    p.add_argument("path", nargs="?")
    p.add_argument("--device", choices=["cpu", "cuda", "auto"], default="auto")
    p.add_argument("--n-gpu-layers", type=int)
    return p


class _Namespace(Mapping[str, Any]):
    """The user's namespace for `str.format_map`, with a missing name as a clear error."""

    def __init__(self, ns: Mapping[str, Any]) -> None:
        self.ns = ns

    def __getitem__(self, key: str) -> Any:
        if key not in self.ns:
            raise NbllmError(f"{{{key}}} is not defined in the notebook; define it, or write {{{{{key}}}}} for a literal brace")
        return self.ns[key]

    def __iter__(self):
        return iter(self.ns)

    def __len__(self) -> int:
        return len(self.ns)


def interpolate(text: str, ns: Mapping[str, Any]) -> str:
    """Fill `{name}` (and `{name.attr}`, `{name[0]}`) from the namespace; `{{` and `}}` are literal braces."""
    try:
        return string.Formatter().vformat(text, (), _Namespace(ns))
    except (ValueError, IndexError, AttributeError) as exc:
        raise NbllmError(f"cannot fill in the cell's {{names}}: {exc}; write {{{{ and }}}} for literal braces") from None


@magics_class
class NbllmMagics(Magics):
    def __init__(self, shell: Any, session: Session | None = None) -> None:
        super().__init__(shell)
        self.session = session or Session()

    # ------------------------------------------------------------------ %%llm

    @cell_magic
    def llm(self, line: str, cell: str) -> None:
        """Generate from the cell's text. `%%llm --help` is not a flag: see the nbllm README for the flags."""
        args = _cell_parser().parse_args(shlex.split(line))
        try:
            request = self._request(args, interpolate(cell.strip("\n"), self.shell.user_ns))
            self._run(request, args)
        except NbllmError as exc:
            _error(exc)
        except KeyboardInterrupt:
            _error("interrupted: generation stopped and its KV blocks were freed")

    def _request(self, args: argparse.Namespace, text: str) -> CellRequest:
        from nbllm.engine.sampling_params import SamplingParams

        structured: dict[str, Any] = {}
        if args.json is not None:
            structured["json_schema"] = self._schema(args.json)
        if args.regex is not None:
            structured["regex"] = args.regex
        if args.choices is not None:
            structured["choices"] = [c.strip() for c in args.choices.split(",") if c.strip()]
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                                seed=args.seed, n=args.n, **structured)
        return CellRequest(text, params, chat=args.chat, system=args.system)

    def _schema(self, name_or_json: str) -> Any:
        if name_or_json in self.shell.user_ns:
            return self.shell.user_ns[name_or_json]
        try:
            return json.loads(name_or_json)
        except json.JSONDecodeError:
            raise NbllmError(f"--json {name_or_json!r} is neither a notebook variable nor valid JSON") from None

    def _run(self, request: CellRequest, args: argparse.Namespace) -> None:
        if not self.session.loaded:
            print("nbllm: loading the model (first use)...", file=sys.stderr, flush=True)
        view = StreamView(request.params.n, live=not args.no_stream)
        dashboard = None if args.no_stream else live_dashboard(request.params.max_tokens * request.params.n)
        final = None
        try:
            for out in self.session.run(request):
                view.update(out)
                if dashboard is not None:
                    blocks = self.session.llm.engine.blocks
                    dashboard.update(sum(len(c.token_ids) for c in out.outputs), blocks.num_used_blocks,
                                     blocks.num_blocks)
                final = out
            view.close()
            if final is None:
                return
            texts = [c.text for c in final.outputs]
            if args.output:
                values = [parse_json_output(t) for t in texts] if args.json is not None else texts
                self.shell.user_ns[args.output] = values if request.params.n > 1 else values[0]
            from nbllm.widgets.dashboard import cell_report

            llm = self.session.llm
            report = cell_report(final.metrics, [c.finish_reason for c in final.outputs], llm.stats(),
                                 llm.engine.kv_snapshot())
            if dashboard is None:
                show(report)
            else:
                dashboard.finish(report)  # the live widgets give way to the static report, in place
        finally:
            if dashboard is not None:
                dashboard.close()  # after an interrupt or error: freeze the last numbers as static HTML

    # ------------------------------------------------------------------ line magics

    @line_magic
    def llm_model(self, line: str) -> None:
        """Load a model now: a GGUF path (default: the embedded Gemma 3 270M)."""
        args = _model_parser().parse_args(shlex.split(line))
        try:
            llm = self.session.switch_model(args.path, args.device, args.n_gpu_layers)
        except NbllmError as exc:
            _error(exc)
            return
        print(f"nbllm: {llm.model_path.name} ({llm.config.arch}, {llm.config.num_layers} layers) on {llm.model.device}")

    @line_magic
    def llm_stats(self, line: str) -> None:
        """Totals of this session: tokens, cache hits, KV blocks, speeds."""
        from nbllm.widgets.dashboard import SessionReport

        if not self.session.loaded:
            print("nbllm: no model loaded yet; run a %%llm cell first")
            return
        show(SessionReport(self.session.llm.stats(), self.session.decode_speeds))

    @line_magic
    def llm_cache(self, line: str) -> None:
        """The radix prefix cache and the KV block map."""
        from nbllm.widgets.dashboard import CacheReport

        if not self.session.loaded:
            print("nbllm: no model loaded yet; run a %%llm cell first")
            return
        llm = self.session.llm
        show(CacheReport(llm.engine.kv_snapshot(), llm.tokenizer.decode))

    @line_magic
    def llm_reset(self, line: str) -> None:
        """Forget the chat history and clear the prefix cache."""
        self.session.reset()
        print("nbllm: conversation and prefix cache cleared")


def _error(exc: BaseException | str) -> None:
    print(f"nbllm: {exc}", file=sys.stderr, flush=True)
