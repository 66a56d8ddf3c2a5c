"""Notebook dashboards drawn from the engine's plain stats (installed as nbllm.widgets)."""
