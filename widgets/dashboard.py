"""What the engine did, drawn three ways from the same plain numbers: HTML/SVG for notebooks (it survives
nbconvert and nbviewer because it is static markup), and text for a terminal IPython.

The engine knows nothing of this module: it publishes dicts (`llm.stats()`, request metrics, `kv_snapshot()`);
these functions only draw them.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

_FREE, _USED, _SHARED, _CACHED = "#e8e8e8", "#4c8bf5", "#f5a623", "#7ed321"


@dataclass
class CellReport:
    """The dashboard shown under a `%%llm` cell."""

    rows: list[tuple[str, str]]
    block_map: Mapping[str, Any] | None = None

    def _repr_html_(self) -> str:
        cells = "".join(
            f"<div style='margin-right:18px'><div style='color:#888;font-size:11px'>{html.escape(k)}</div>"
            f"<div style='font-size:14px;font-weight:600'>{html.escape(v)}</div></div>"
            for k, v in self.rows
        )
        svg = block_map_svg(self.block_map) if self.block_map else ""
        return (f"<div class='nbllm-report' style='font-family:sans-serif;border-top:1px solid #ddd;padding-top:6px'>"
                f"<div style='display:flex;flex-wrap:wrap'>{cells}</div>{svg}</div>")

    def __repr__(self) -> str:
        return " | ".join(f"{k}: {v}" for k, v in self.rows)


def cell_report(metrics: Any, finish_reasons: Sequence[str | None], stats: Mapping[str, Any],
                block_map: Mapping[str, Any] | None = None) -> CellReport:
    """Rows for one request: tokens, time to first token, speeds, KV use, cache hit rate, finish reason."""
    computed = metrics.prompt_tokens - metrics.cached_prompt_tokens
    prefill_s = (metrics.first_token_time or 0) - (metrics.first_scheduled_time or 0)
    hit = metrics.cached_prompt_tokens / metrics.prompt_tokens if metrics.prompt_tokens else 0.0
    rows = [
        ("prompt tokens", f"{metrics.prompt_tokens}"),
        ("cached", f"{metrics.cached_prompt_tokens} ({hit:.0%})"),
        ("generated", f"{metrics.generated_tokens}"),
        ("TTFT", _ms(metrics.ttft)),
        ("prefill", f"{computed / prefill_s:.0f} tok/s" if prefill_s > 0 and computed else "–"),
        ("decode", f"{metrics.decode_tok_s:.1f} tok/s" if metrics.decode_tok_s else "–"),
        ("KV blocks", f"{stats['kv_blocks_used']}/{stats['kv_blocks_total']}"),
        ("finish", ", ".join(sorted({str(r) for r in finish_reasons}))),
    ]
    return CellReport(rows, block_map)


def _ms(seconds: float | None) -> str:
    return "–" if seconds is None else f"{seconds * 1000:.0f} ms"


@dataclass
class SessionReport:
    """`%llm_stats`: totals of the session and a sparkline of decode speed per cell."""

    stats: Mapping[str, Any]
    history: Sequence[float]

    def _repr_html_(self) -> str:
        rows = "".join(f"<tr><td>{html.escape(k)}</td><td style='text-align:right'>{_fmt(v)}</td></tr>"
                       for k, v in self.stats.items())
        return f"<table>{rows}</table>{sparkline_svg(self.history, 'decode tok/s per cell')}"

    def __repr__(self) -> str:
        lines = [f"{k:>22}: {_fmt(v)}" for k, v in self.stats.items()]
        if self.history:
            lines.append(f"{'decode tok/s per cell':>22}: " + " ".join(f"{v:.0f}" for v in self.history))
        return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def sparkline_svg(values: Sequence[float], title: str, width: int = 320, height: int = 60) -> str:
    if not values:
        return ""
    top = max(values) or 1.0
    step = width / max(1, len(values) - 1)
    points = " ".join(f"{i * step:.1f},{height - 4 - (v / top) * (height - 8):.1f}" for i, v in enumerate(values))
    return (f"<div style='font-size:11px;color:#888'>{html.escape(title)} (max {top:.0f})</div>"
            f"<svg width='{width}' height='{height}'><polyline fill='none' stroke='{_USED}' stroke-width='2' "
            f"points='{points}'/></svg>")


@dataclass
class CacheReport:
    """`%llm_cache`: the radix tree (token snippets, refcounts, blocks) and the KV block map."""

    snapshot: Mapping[str, Any]
    decode: Any  # token ids -> text, for the snippets

    def _tree_lines(self) -> list[str]:
        lines = []
        for node in self.snapshot["nodes"]:
            snippet = self.decode(list(node.token_ids[:24])).replace("\n", "⏎")
            more = "…" if len(node.token_ids) > 24 else ""
            lines.append(f"{'  ' * node.depth}└ {snippet!r}{more}  blocks {list(node.blocks)} "
                         f"refs {list(node.refcounts)}{'' if node.evictable else '  (in use)'}")
        return lines or ["(the prefix cache is empty)"]

    def _repr_html_(self) -> str:
        tree = html.escape("\n".join(self._tree_lines()))
        return f"<pre style='font-size:12px'>{tree}</pre>{block_map_svg(self.snapshot)}"

    def __repr__(self) -> str:
        return "\n".join(self._tree_lines() + [block_map_text(self.snapshot)])


def _block_colors(snapshot: Mapping[str, Any]) -> list[str]:
    cached = snapshot["cached"]
    colors = []
    for block, refs in enumerate(snapshot["refcounts"]):
        if refs == 0:
            colors.append(_FREE)
        elif block in cached and refs == 1:
            colors.append(_CACHED)
        else:
            colors.append(_SHARED if refs > 1 else _USED)
    return colors


def block_map_svg(snapshot: Mapping[str, Any], cell: int = 7, per_row: int = 64, limit: int = 4096) -> str:
    """One square per KV block: free, used by one sequence, shared, or held only by the prefix cache."""
    colors = _block_colors(snapshot)[:limit]
    rows = -(-len(colors) // per_row)
    rects = "".join(
        f"<rect x='{(i % per_row) * cell}' y='{(i // per_row) * cell}' width='{cell - 1}' height='{cell - 1}' "
        f"fill='{c}'/>" for i, c in enumerate(colors))
    legend = " ".join(f"<span style='color:{c}'>■</span> {name}" for name, c in
                      (("free", _FREE), ("used", _USED), ("shared", _SHARED), ("prefix cache", _CACHED)))
    shown = f" (first {limit} of {len(snapshot['refcounts'])})" if len(snapshot["refcounts"]) > limit else ""
    return (f"<div style='font-size:11px;color:#888;margin-top:6px'>KV block map{shown}: {legend}</div>"
            f"<svg width='{per_row * cell}' height='{rows * cell}'>{rects}</svg>")


def block_map_text(snapshot: Mapping[str, Any]) -> str:
    colors = _block_colors(snapshot)
    counts = {name: colors.count(c) for name, c in
              (("free", _FREE), ("used", _USED), ("shared", _SHARED), ("prefix cache", _CACHED))}
    return "KV blocks: " + ", ".join(f"{n} {name}" for name, n in counts.items())
