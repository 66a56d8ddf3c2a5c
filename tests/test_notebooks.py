"""The tutorials in `notebooks/` are committed without outputs, so that the repository stays small and diffs stay
readable. They are run cell by cell in a fresh kernel by nbval: pyproject's pytest settings add `notebooks/` to the
test paths with `--nbval-lax` (a cell that raises fails; outputs are not compared, since they hold timings)."""

from __future__ import annotations

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path: Path) -> None:
    nb = nbformat.read(path, as_version=4)
    stale = [i for i, c in enumerate(nb.cells)
             if c.cell_type == "code" and (c.outputs or c.execution_count is not None)]
    assert not stale, f"{path.name}: cells {stale} carry outputs; clear them before committing"
